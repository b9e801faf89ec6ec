"""Which clients a round (or a free asynchronous slot) asks: uniformly at random, or
adaptively by utility, Oort-style.

Lai et al., 2021, "Oort: Efficient Federated Learning via Guided Participant Selection"
(OSDI). A client's utility is its statistical utility (how much its data can still teach
the model: its sample count times its recent training loss) times a system penalty when
it is slower than the preferred round time T:

    U_i = n_i * loss_i * (T / t_i) ** alpha   if t_i > T,   n_i * loss_i   otherwise

A share of every draw is left to exploration (clients never measured come first, so new
ones get a turn), and clients with poor reliability, high suspicion or in quarantine are
avoided. Everything here is O(clients) per draw and works on plain `Candidate` records,
so it is tested without a coordinator.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..spec import ClientPhase, FederatedJobSpec

if TYPE_CHECKING:
    from .registry import Client

SelectionMode = Literal["random", "adaptive"]

# A reliability needs a few dispatches before it says anything.
_MIN_DISPATCHES = 3


@dataclass(frozen=True)
class SelectionConfig:
    """The selection settings of one job (mapped from spec.selection by the engine)."""

    mode: SelectionMode = "random"
    exploration: float = 0.2
    preferred_round_seconds: float | None = None  # None: the median measured time
    min_reliability: float = 0.5
    max_suspicion: float = 0.5
    alpha: float = 2.0  # Oort's straggler penalty exponent


@dataclass(frozen=True)
class Candidate:
    """What selection knows of one eligible client."""

    node_id: str
    samples: int
    loss: float | None = None  # its last reported training loss; None: never measured
    seconds: float | None = None  # its last round time (dispatch to accepted update)
    reliability: float | None = None  # answered / dispatched
    dispatched: int = 0
    suspicion: float | None = None
    quarantined: bool = False


@dataclass(frozen=True)
class Choice:
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


def choose(candidates: Sequence[Candidate], *, wanted: int, config: SelectionConfig,
           rng: random.Random) -> tuple[list[str], dict[str, Choice]]:
    """Pick `wanted` node ids of `candidates` and say why for each candidate.

    random: a uniform sample (of the clients not excluded, when enough remain).
    adaptive: the top utilities, with round(exploration x wanted) picks left to chance
    (never-measured clients first). Candidates are taken in node-id order, so a seeded
    rng gives the same choice. Excluded clients are picked only when too few others
    remain for `wanted` (those excluded for reliability first; never quarantined ones).
    """
    ordered = sorted(candidates, key=lambda c: c.node_id)
    wanted = max(0, min(wanted, len(ordered)))
    excluded = {c.node_id: why for c in ordered if (why := exclusion(c, config))}
    allowed = [c for c in ordered if c.node_id not in excluded]
    choices: dict[str, Choice] = {}
    if config.mode == "random":
        picked = rng.sample(allowed, min(wanted, len(allowed)))
        for c in picked:
            choices[c.node_id] = Choice(c.node_id, True, "random")
    else:
        picked = _adaptive(allowed, wanted=wanted, config=config, rng=rng, choices=choices)
    if len(picked) < wanted:  # too few allowed: the least bad of the excluded
        spare = [c for c in ordered if c.node_id in excluded and not c.quarantined]
        spare.sort(key=lambda c: (c.suspicion or 0.0, -(c.reliability or 0.0)))
        for c in spare[:wanted - len(picked)]:
            picked.append(c)
            choices[c.node_id] = Choice(c.node_id, True, f"{excluded[c.node_id]} (too few others)")
    for c in ordered:
        if c.node_id not in choices:
            choices[c.node_id] = Choice(c.node_id, False, excluded.get(c.node_id, "not picked"))
    return [c.node_id for c in picked], choices


def _adaptive(allowed: list[Candidate], *, wanted: int, config: SelectionConfig,
              rng: random.Random, choices: dict[str, Choice]) -> list[Candidate]:
    measured = [c.seconds for c in allowed if c.seconds]
    preferred = config.preferred_round_seconds or (
        statistics.median(measured) if measured else None)
    scores = {c.node_id: utility(c, preferred_seconds=preferred, alpha=config.alpha)
              for c in allowed}
    explore = min(wanted, round(config.exploration * wanted))
    scored = sorted((c for c in allowed if scores[c.node_id] is not None),
                    key=lambda c: (-scores[c.node_id], c.node_id))  # type: ignore[operator]
    unmeasured = [c for c in allowed if scores[c.node_id] is None]
    # Exploit: the best utilities, leaving room for exploration (and for unmeasured
    # clients when there are not enough measured ones).
    exploit = scored[:wanted - explore]
    picked = list(exploit)
    for c in exploit:
        choices[c.node_id] = Choice(c.node_id, True, "utility", scores[c.node_id])
    taken = {c.node_id for c in exploit}
    rest = [c for c in scored if c.node_id not in taken]
    # Explore: never-measured clients first, then the others at random.
    new = rng.sample(unmeasured, min(len(unmeasured), wanted - len(picked)))
    old = rng.sample(rest, min(len(rest), wanted - len(picked) - len(new)))
    for c in (*new, *old):
        picked.append(c)
        choices[c.node_id] = Choice(c.node_id, True, "exploration", scores[c.node_id])
    for c in allowed:
        if c.node_id not in choices and scores[c.node_id] is not None:
            choices[c.node_id] = Choice(c.node_id, False, "not picked", scores[c.node_id])
    return picked


def candidate_of(client: Client, *, job: str, offline_after: float) -> Candidate:
    """A registry record as selection sees it. Suspicion and phase are read from the
    client's published status, whatever computes them (robust aggregation's set-asides,
    anomaly scores), so selection follows the ClientNode users see."""
    now = time.monotonic()
    status = client.status(job=job, now=now, offline_after=offline_after, wall_now=time.time())
    return Candidate(
        node_id=client.node_id, samples=client.spec.data_size, loss=client.local_loss,
        seconds=client.last_round_seconds, reliability=status.reliability,
        dispatched=client.dispatched, suspicion=status.suspicion,
        quarantined=status.phase is ClientPhase.quarantined)


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
