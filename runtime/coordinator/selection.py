"""Which clients a round (or a free asynchronous slot) asks: uniformly at random, or
adaptively by utility, Oort-style.

Lai et al., 2021, "Oort: Efficient Federated Learning via Guided Participant Selection"
(OSDI). A client's utility is its statistical utility (how much its data can still teach
the model: its sample count times its recent training loss) times a system penalty when
it is slower than the preferred round time T:

    U_i = n_i * loss_i * (T / t_i) ** alpha   if t_i > T,   n_i * loss_i   otherwise

A share of every draw is left to exploration (clients never measured come first, so new
ones get a turn). The draw over-commits (Oort's 1.3x, `draw_size`): the round closes at
the updates it wants, so the slowest of the drawn cost only their own updates. Clients
with poor reliability, high suspicion or in quarantine are avoided. Everything here is
O(clients) per draw and works on plain `Candidate` records, so it is tested without a
coordinator.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

from ..spec import FederatedJobSpec

if TYPE_CHECKING:
    from .registry import Client

SelectionMode = Literal["random", "adaptive"]

# A reliability needs a few dispatches before it says anything.
_MIN_DISPATCHES = 3

#: Clients drawn per update a round wants, before dropout (Oort's default, Lai et al.
#: 2021, section 5): the round closes at `wanted`, so the slowest ~23% drawn are not
#: waited for, most of all in a first round, when no client's speed is known yet.
OVERCOMMIT = 1.3


@dataclass(frozen=True)
class SelectionConfig:
    """The selection settings of one job (mapped from spec.selection by the engine)."""

    mode: SelectionMode = "random"
    exploration: float = 0.2
    preferred_round_seconds: float | None = None  # None: the median measured time
    min_reliability: float = 0.5
    max_suspicion: float = 0.5
    alpha: float = 2.0  # Oort's straggler penalty exponent


# Candidate and Choice are named tuples: a round builds one of each per eligible client,
# and a tuple costs a fraction of a frozen dataclass's __init__ (bench/heterogeneity.py).
class Candidate(NamedTuple):
    """What selection knows of one eligible client."""

    node_id: str
    samples: int
    loss: float | None = None  # its last reported training loss; None: never measured
    seconds: float | None = None  # its last round time (dispatch to accepted update)
    reliability: float | None = None  # answered / dispatched
    dispatched: int = 0
    suspicion: float | None = None
    quarantined: bool = False


class Choice(NamedTuple):
    """Why a candidate was or was not picked: `reason` is utility, exploration, random,
    not picked, or what excluded it; `score` its utility (adaptive, when measured)."""

    node_id: str
    picked: bool
    reason: str
    score: float | None = None


def exclusion(candidate: Candidate, config: SelectionConfig) -> str | None:
    """Why `candidate` must be avoided, or None."""
    if candidate.quarantined:
        return "excluded: quarantined"
    if candidate.suspicion is not None and candidate.suspicion > config.max_suspicion:
        return f"excluded: suspicion {candidate.suspicion:.2f} > {config.max_suspicion:g}"
    if (candidate.reliability is not None and candidate.dispatched >= _MIN_DISPATCHES
            and candidate.reliability < config.min_reliability):
        return f"excluded: reliability {candidate.reliability:.2f} < {config.min_reliability:g}"
    return None


def utility(candidate: Candidate, *, preferred_seconds: float | None, alpha: float
            ) -> float | None:
    """Oort's utility of a measured candidate; None when it was never measured."""
    if candidate.loss is None or not math.isfinite(candidate.loss):
        return None
    statistical = max(1, candidate.samples) * max(candidate.loss, 1e-6)
    seconds = candidate.seconds
    if preferred_seconds and seconds and seconds > preferred_seconds:
        statistical *= (preferred_seconds / seconds) ** alpha
    return statistical


def draw_size(wanted: int, *, eligible: int, expected_dropout: float, exploration: float,
              overcommit: float = OVERCOMMIT) -> int:
    """Clients adaptive selection asks for a round that closes at `wanted` updates:
    `wanted` over-committed (and padded for the dropout seen so far), with at least the
    exploration picks on top, and never more than are eligible."""
    padded = wanted / max(1e-6, 1.0 - expected_dropout)
    size = max(math.ceil(padded * overcommit - 1e-9),
               math.ceil(padded - 1e-9) + math.ceil(exploration * wanted - 1e-9))
    return max(0, min(eligible, size))


def choose(candidates: Sequence[Candidate], *, wanted: int, config: SelectionConfig,
           rng: random.Random) -> tuple[list[str], dict[str, Choice]]:
    """Pick `wanted` node ids of `candidates` and say why for each candidate.

    random: a uniform sample (of the clients not excluded, when enough remain).
    adaptive: the top utilities, with round(exploration x wanted) picks left to chance
    (never-measured clients first). Candidates are taken in node-id order, so a seeded
    rng gives the same choice. Excluded clients are picked only when too few others
    remain for `wanted` (those excluded for reliability first; never quarantined ones).
    One sort and a few linear passes: O(clients log clients) with a small constant.
    """
    ordered = sorted(candidates, key=lambda c: c.node_id)
    wanted = max(0, min(wanted, len(ordered)))
    allowed: list[Candidate] = []
    excluded: list[tuple[Candidate, str]] = []
    for c in ordered:
        why = exclusion(c, config)
        if why is None:
            allowed.append(c)
        else:
            excluded.append((c, why))
    choices: dict[str, Choice] = {}
    if config.mode == "random":
        picked = rng.sample(allowed, min(wanted, len(allowed)))
        for c in picked:
            choices[c.node_id] = Choice(c.node_id, True, "random")
    else:
        picked = _adaptive(allowed, wanted=wanted, config=config, rng=rng, choices=choices)
    if len(picked) < wanted:  # too few allowed: the least bad of the excluded
        spare = [(c, why) for c, why in excluded if not c.quarantined]
        spare.sort(key=lambda pair: (pair[0].suspicion or 0.0, -(pair[0].reliability or 0.0)))
        for c, why in spare[:wanted - len(picked)]:
            picked.append(c)
            choices[c.node_id] = Choice(c.node_id, True, f"{why} (too few others)")
    for c, why in excluded:
        if c.node_id not in choices:
            choices[c.node_id] = Choice(c.node_id, False, why)
    for c in allowed:
        if c.node_id not in choices:
            choices[c.node_id] = Choice(c.node_id, False, "not picked")
    return [c.node_id for c in picked], choices


def _adaptive(allowed: list[Candidate], *, wanted: int, config: SelectionConfig,
              rng: random.Random, choices: dict[str, Choice]) -> list[Candidate]:
    measured = [c.seconds for c in allowed if c.seconds]
    preferred = config.preferred_round_seconds or (
        statistics.median(measured) if measured else None)
    scored: list[tuple[float, Candidate]] = []
    unmeasured: list[Candidate] = []
    for c in allowed:
        score = utility(c, preferred_seconds=preferred, alpha=config.alpha)
        if score is None:
            unmeasured.append(c)
        else:
            scored.append((score, c))
    explore = min(wanted, round(config.exploration * wanted))
    scored.sort(key=lambda pair: (-pair[0], pair[1].node_id))
    # Exploit: the best utilities, leaving room for exploration (and for unmeasured
    # clients when there are not enough measured ones).
    exploit = scored[:wanted - explore]
    picked = [c for _, c in exploit]
    for score, c in exploit:
        choices[c.node_id] = Choice(c.node_id, True, "utility", score)
    rest = scored[len(exploit):]
    # Explore: never-measured clients first, then the others at random.
    new = rng.sample(unmeasured, min(len(unmeasured), wanted - len(picked)))
    for c in new:
        picked.append(c)
        choices[c.node_id] = Choice(c.node_id, True, "exploration")
    for score, c in rng.sample(rest, min(len(rest), wanted - len(picked))):
        picked.append(c)
        choices[c.node_id] = Choice(c.node_id, True, "exploration", score)
    for score, c in rest:
        if c.node_id not in choices:
            choices[c.node_id] = Choice(c.node_id, False, "not picked", score)
    return picked


def candidate_of(client: Client) -> Candidate:
    """A registry record as selection sees it. Reliability, suspicion and quarantine are
    the values the client's ClientNode status shows (the same `Client` methods build
    both), whatever computes them (robust aggregation's set-asides, anomaly scores), so
    selection follows what users see; read from the record, not from a built status, so
    a round's selection over a thousand clients costs milliseconds."""
    return Candidate(
        node_id=client.node_id, samples=client.spec.data_size, loss=client.local_loss,
        seconds=client.last_round_seconds, reliability=client.reliability(),
        dispatched=client.dispatched, suspicion=client.shown_suspicion(),
        quarantined=client.quarantined and not client.departed)


def record_choices(clients: Sequence[Client], choices: dict[str, Choice]) -> None:
    """Keep each client's last choice on its record (shown on its ClientNode)."""
    for client in clients:
        choice = choices.get(client.node_id)
        if choice is not None:
            client.selection = choice.reason
            client.selection_score = None if choice.score is None else round(choice.score, 4)


def selection_config(spec: FederatedJobSpec) -> SelectionConfig:
    """spec.selection as selection's own frozen config."""
    chosen = spec.selection
    return SelectionConfig(
        mode=chosen.mode, exploration=chosen.exploration,
        preferred_round_seconds=chosen.preferred_round_seconds,
        min_reliability=chosen.min_reliability, max_suspicion=chosen.max_suspicion)
