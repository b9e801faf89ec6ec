"""One round's aggregation, as the coordinator drives it.

Updates are folded in as they arrive. Averaging strategies (fedavg, fedprox, fedadam,
fedyogi) keep only a running weighted sum, so a round costs O(model) memory however many
clients report. Robust rules need every update at once; they keep them in a buffer whose
size the coordinator bounds. `finish` turns what arrived into the round's mean delta,
which the coordinator hands to the `ServerOptimizer` from `server_optimizer_for`. What
a rule needs (buffered or not, its floor) comes from the strategy catalog.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor

from . import anomaly
from ._tensors import UpdateStats, Weights, check_matches, layout_of
from .catalog import AggregationConfig, rule_for
from .clipping import CenteredClipSum, RoundHistory
from .fednova import NormalizedSum
from .registry import aggregate_buffered
from .robust import RobustResult, coordinate_median
from .weighted import Bound, EmptyAggregationError, WeightedSum

UpdateTransform = Callable[[Weights], Weights]
"""Applied to each delta before it is aggregated (central DP clips here); must return
new tensors shaped like its input and leave its input alone."""


class BufferFullError(RuntimeError):
    """A robust round was offered more updates than its buffer may hold."""


@dataclass(frozen=True)
class AggregateOutcome:
    """The result of a round.

    mean_delta: the aggregate delta to hand to the server optimizer.
    used: node ids whose updates went into it, in arrival order.
    set_aside: node ids a robust rule rejected, in arrival order.
    scores: each accepted node's anomaly score in [0, 1] (aggregation/anomaly.py), and
    `reasons` the signal behind each score that was not 0.
    distances: the updates' distances to the centered-clipping centre (centeredclip
    only), for the next round's adaptive radius.
    """

    mean_delta: Weights
    used: tuple[str, ...]
    set_aside: tuple[str, ...]
    scores: Mapping[str, float] = field(default_factory=dict)
    reasons: Mapping[str, str] = field(default_factory=dict)
    distances: tuple[float, ...] = ()


class RoundAggregator:
    """Collects one round's client deltas and aggregates them by `config`'s rule.

    Averaging strategies weight each delta by its client's num_samples, or equally when
    `uniform_weights` is set (DP-FedAvg, McMahan et al., 2018, "Learning Differentially
    Private Recurrent Language Models", averages clipped updates with fixed weights so one
    client's influence stays bounded). Robust rules ignore num_samples: weighting by a
    number the client itself reports would hand attackers a lever.

    `max_buffered` bounds how many updates a robust round holds (ignored, and may be 0,
    for averaging strategies). Buffered deltas are kept by reference, never modified;
    callers must not modify a delta after handing it over. `hold` (fedavg's family and
    fednova, without a transform) lets the weighted sum keep up to that many accepted
    deltas by reference and fold them together (`WeightedSum`) at the next `flush` (or
    when one more arrives): faster, for that much more memory unless the caller holds
    those deltas anyway (the coordinator's waiting ones).
    """

    def __init__(
        self,
        config: AggregationConfig,
        template: Weights,
        *,
        max_buffered: int,
        transform: UpdateTransform | None = None,
        uniform_weights: bool = False,
        history: RoundHistory | None = None,
        hold: int = 0,
    ) -> None:
        robust = rule_for(config.rule).buffered
        # Averaging strategies buffer nothing, so 0 is fine for them; a robust round
        # that may hold nothing could never aggregate.
        least = 1 if robust else 0
        if isinstance(max_buffered, bool) or not isinstance(max_buffered, int) or max_buffered < least:
            raise ValueError(
                f"max_buffered must be an integer >= {least} for rule "
                f"{config.rule!r}, got {max_buffered!r}"
            )
        self._config = config
        self._layout = layout_of(template)
        self._max_buffered = max_buffered
        self._transform = transform
        self._uniform = uniform_weights
        self._robust = robust
        history = history or RoundHistory()
        self._reference = history.centre
        self._reference_norm = anomaly.l2_norm(history.centre) if history.centre else 0.0
        self._clip: CenteredClipSum | None = None
        self._sum: WeightedSum | NormalizedSum | None = None
        # A transformed delta is a new copy: holding it would cost memory the waiting
        # deltas (held by their callers anyway) do not.
        hold = hold if transform is None else 0
        if not robust and rule_for(config.rule).fold == "centered_clip":
            self._clip = CenteredClipSum(template, centre=history.centre,
                                         radius=config.clip_radius,
                                         previous_radius=history.radius)
            self._uniform = True  # every update counts the same
        elif not robust and config.rule == "fednova":
            self._sum = NormalizedSum(template, hold=hold)
        elif not robust:
            self._sum = WeightedSum(template, hold=hold)
        self._stats: list[anomaly.UpdateStats] = []
        self._buffer: list[Weights] = []
        self._nodes: list[str] = []
        self._finished = False

    @property
    def config(self) -> AggregationConfig:
        return self._config

    @property
    def count(self) -> int:
        """How many updates were accepted."""
        return len(self._nodes)

    @property
    def buffered(self) -> int:
        """How many whole updates are held in memory (always 0 for averaging strategies)."""
        return len(self._buffer)

    @property
    def held(self) -> int:
        """How many accepted deltas wait, by reference, for the next fold (`hold`)."""
        return self._sum.held if self._sum is not None else 0

    @property
    def node_ids(self) -> tuple[str, ...]:
        """Who contributed, in arrival order."""
        return tuple(self._nodes)

    def add(self, node_id: str, delta: Mapping[str, Tensor], num_samples: int, *,
            bound: Bound | None = None, local_steps: int = 1) -> UpdateStats:
        """Accept `node_id`'s delta, trained on `num_samples` examples for `local_steps`
        steps (which only fednova reads: it normalises by them); return its stats
        (the norm of the delta as sent, from the same read as its finiteness check).

        `bound` (admission's norm bound) sees those stats before anything is committed
        and returns the factor in (0, 1] the delta is taken with (1: as sent), or raises
        to refuse it. Raises ValueError (naming the node and tensor) for a delta that
        does not match the template or holds NaN/Inf, a repeated node, or a bad
        num_samples; BufferFullError when a robust round already holds max_buffered
        updates; RuntimeError after `finish`. A rejected update changes nothing.
        """
        if self._finished:
            raise RuntimeError("this round was already aggregated; start a new RoundAggregator")
        if node_id in self._nodes:
            raise ValueError(f"node {node_id!r} already submitted an update this round")
        least = 0 if self._uniform or self._robust else 1
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < least:
            raise ValueError(
                f"update from {node_id!r}: num_samples must be an integer >= {least}, "
                f"got {num_samples!r}"
            )
        if self._robust and len(self._buffer) >= self._max_buffered:
            raise BufferFullError(
                f"update from {node_id!r} refused: the {self._config.rule} buffer "
                f"already holds max_buffered={self._max_buffered} updates"
            )
        what = f"update from {node_id!r}"
        weight = 1.0 if self._uniform else float(num_samples)
        if self._transform is None and self._sum is not None:
            # The common path: one read for checks and stats, one fold, no copy.
            # Scored as received: its norm and its inner product with the last aggregate
            # (where there is one) from the same read as its finiteness check.
            if isinstance(self._sum, NormalizedSum):
                stats = self._sum.add(delta, weight, local_steps, what=what, bound=bound,
                                      reference=self._reference)
            else:
                stats = self._sum.add(delta, weight, what=what, bound=bound,
                                      reference=self._reference)
            self._nodes.append(node_id)
            self._stats.append(anomaly.with_norm(delta, stats.norm, self._reference,
                                                 self._reference_norm, dot=stats.dot))
            return stats
        sent = delta
        # Checked before the transform too: a transform may hide a NaN (a clip by a NaN
        # norm), and its own output is checked below like any update.
        stats = check_matches(self._layout, delta, what=what)
        factor = 1.0 if bound is None else float(bound(stats))
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"{what}: the bound's factor must be in (0, 1], got {factor!r}")
        if factor < 1.0:
            delta = {k: v * factor if v.is_floating_point() else v for k, v in delta.items()}
        if self._transform is not None:
            delta = self._transform(dict(delta))
            what = f"transformed update from {node_id!r}"
        if self._clip is not None:
            self._clip.add(delta, what=what)
        elif isinstance(self._sum, NormalizedSum):
            self._sum.add(delta, weight, local_steps, what=what)
        elif self._sum is not None:
            self._sum.add(delta, weight, what=what)
        else:
            if self._transform is not None:
                check_matches(self._layout, delta, what=what)
            self._buffer.append(dict(delta))
        self._nodes.append(node_id)
        self._stats.append(anomaly.with_norm(sent, stats.norm, self._reference,
                                             self._reference_norm))
        return stats

    def flush(self) -> None:
        """Fold the deltas `hold` keeps waiting, now, together: a caller that takes several
        waiting deltas at once adds them all and then flushes, so the sum is read and
        written once for the lot. Nothing to do for rules that keep no held deltas."""
        if self._sum is not None:
            self._sum.flush()

    def finish(self) -> AggregateOutcome:
        """Aggregate what arrived. Once only; frees the buffer.

        Raises EmptyAggregationError when nothing arrived and TooFewUpdatesError when a
        robust rule got fewer updates than `minimum_updates` (the round can then be
        retried; nothing was consumed).
        """
        if self._finished:
            raise RuntimeError("finish() was already called for this round")
        if not self._nodes:
            raise EmptyAggregationError("no client updates arrived this round")
        norms = [s.norm for s in self._stats]
        cosines: list[float | None] = [s.cosine for s in self._stats]
        if self._clip is not None:
            outcome = AggregateOutcome(self._clip.mean(), tuple(self._nodes), (),
                                       distances=tuple(self._clip.distances))
            scores = anomaly.anomaly_scores(norms, cosines)
        elif self._sum is not None:
            outcome = AggregateOutcome(self._sum.mean(), tuple(self._nodes), ())
            scores = anomaly.anomaly_scores(norms, cosines)
        else:
            result = self._robust_aggregate()
            outcome = AggregateOutcome(
                mean_delta=result.aggregate,
                used=tuple(self._nodes[i] for i in result.selected),
                set_aside=tuple(self._nodes[i] for i in result.set_aside),
            )
            # The buffer is here anyway: score against this round's own robust centre.
            median = (result.aggregate if self._config.rule == "median"
                      else coordinate_median(self._buffer).aggregate)
            scores = anomaly.anomaly_scores(
                norms, anomaly.cosines_to(self._buffer, result.aggregate),
                anomaly.distances_to(self._buffer, median))
        outcome = dataclasses.replace(
            outcome, scores=dict(zip(self._nodes, scores.scores, strict=True)),
            reasons={n: r for n, r in zip(self._nodes, scores.reasons, strict=True) if r})
        self._finished = True
        self._buffer = []
        self._sum = None
        self._clip = None
        return outcome

    def _robust_aggregate(self) -> RobustResult:
        return aggregate_buffered(self._config, self._buffer)
