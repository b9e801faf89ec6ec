"""Anomaly scores (aggregation/anomaly.py), centered clipping (aggregation/clipping.py)
and what the RoundAggregator reports of both."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from fedkube.runtime.aggregation import (
    AggregationConfig,
    CenteredClipSum,
    RoundAggregator,
    RoundHistory,
    anomaly,
    rule_for,
    rule_names,
)
from fedkube.runtime.aggregation.catalog import cost_table

Weights = dict[str, torch.Tensor]
TEMPLATE: Weights = {"w": torch.zeros(6, 4), "b": torch.zeros(4)}
README = Path(__file__).resolve().parents[2] / "README.md"


def _honest(seed: int, *, direction: float = 1.0) -> Weights:
    generator = torch.Generator().manual_seed(seed)
    return {"w": direction * torch.ones(6, 4) + 0.2 * torch.randn(6, 4, generator=generator),
            "b": direction * torch.ones(4) + 0.2 * torch.randn(4, generator=generator)}


def _times(update: Weights, factor: float) -> Weights:
    return {k: v * factor for k, v in update.items()}


def test_measure_folds_norm_and_cosine_in_one_pass() -> None:
    update = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    reference = {"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0])}
    stats = anomaly.measure(update, reference)
    assert stats.norm == pytest.approx(5.0)
    assert stats.cosine == pytest.approx(0.6)
    assert anomaly.measure(update, None).cosine is None
    # Tensor by tensor gives the same (the decode path may fold one tensor at a time).
    fold = anomaly.StatsFold(reference, 1.0)
    for name, tensor in update.items():
        fold.add(name, tensor)
    assert fold.stats() == stats


def test_outliers_score_high_and_an_honest_round_scores_zero() -> None:
    honest = [_honest(seed) for seed in range(8)]
    reference = _honest(99)
    stats = [anomaly.measure(u, reference) for u in honest]
    calm = anomaly.anomaly_scores([s.norm for s in stats], [s.cosine for s in stats])
    assert max(calm.scores) == 0.0 and not any(calm.reasons)

    scaled = _times(_honest(8), 20.0)  # norm outlier
    flipped = _times(_honest(9), -1.0)  # same norm, opposite direction
    updates = [*honest, scaled, flipped]
    stats = [anomaly.measure(u, reference) for u in updates]
    scores = anomaly.anomaly_scores([s.norm for s in stats], [s.cosine for s in stats])
    assert scores.scores[:8] == (0.0,) * 8
    assert scores.scores[8] == 1.0 and scores.reasons[8].startswith("norm")
    assert scores.scores[9] == 1.0 and scores.reasons[9].startswith("cosine")


def test_distance_to_the_median_catches_what_norm_and_cosine_miss() -> None:
    honest = [_honest(seed) for seed in range(8)]
    # Same norm as an honest update, and no reference direction: only its distance to
    # the coordinate-wise median gives it away.
    odd = {"w": torch.zeros(6, 4), "b": torch.zeros(4)}
    odd["w"][0, :] = anomaly.l2_norm(honest[0]) / 2  # four entries: the same norm
    updates = [*honest, odd]
    norms = [anomaly.l2_norm(u) for u in updates]
    median = {k: torch.stack([u[k] for u in updates]).median(0).values for k in TEMPLATE}
    blind = anomaly.anomaly_scores(norms, [None] * len(updates))
    seen = anomaly.anomaly_scores(norms, [None] * len(updates),
                                  anomaly.distances_to(updates, median))
    assert blind.scores[-1] == 0.0
    assert seen.scores[-1] == 1.0 and seen.reasons[-1].startswith("distance to median")
    assert anomaly.anomaly_scores([1.0, 50.0], [None, None]).scores == (0.0, 0.0)  # too few


@pytest.mark.parametrize("rule", ["fedavg", "centeredclip", "median", "krum"])
def test_the_round_aggregator_scores_every_update_under_every_kind_of_rule(rule: str) -> None:
    history = RoundHistory()
    history.advance(_honest(100), [])
    config = AggregationConfig(rule=rule, byzantine=1)
    aggregator = RoundAggregator(config, TEMPLATE, max_buffered=10, history=history)
    for seed in range(7):
        aggregator.add(f"h{seed}", _honest(seed), 10)
    aggregator.add("bad", _times(_honest(7), -4.0), 10)
    outcome = aggregator.finish()
    assert set(outcome.scores) == {*(f"h{s}" for s in range(7)), "bad"}
    assert outcome.scores["bad"] == 1.0 and "bad" in outcome.reasons
    assert max(outcome.scores[f"h{s}"] for s in range(7)) == 0.0
    assert aggregator.buffered == 0
    assert len(outcome.distances) == (8 if rule == "centeredclip" else 0)


def test_centered_clipping_bounds_each_update_around_the_centre() -> None:
    centre = {"w": torch.ones(6, 4), "b": torch.ones(4)}
    radius = 0.5
    clip = CenteredClipSum(TEMPLATE, centre=centre, radius=radius)
    honest = [_honest(seed) for seed in range(4)]
    attack = _times(_honest(5), -1000.0)
    for update in [*honest, attack]:
        clip.add(update)
    mean = clip.mean()
    # centre + mean of clipped differences: each difference has norm <= radius.
    assert anomaly.l2_norm({k: mean[k] - centre[k] for k in mean}) <= radius + 1e-6
    assert clip.clipped >= 1
    # Plain FedAvg of the same updates is dragged a thousand-fold away.
    fedavg = {k: torch.stack([u[k] for u in [*honest, attack]]).mean(0) for k in TEMPLATE}
    assert anomaly.l2_norm(fedavg) > 100 * anomaly.l2_norm(mean)


def test_centered_clipping_with_a_wide_radius_is_the_plain_mean() -> None:
    updates = [_honest(seed) for seed in range(5)]
    clip = CenteredClipSum(TEMPLATE, centre=_honest(9), radius=1e6)
    for update in updates:
        clip.add(update)
    mean = {k: torch.stack([u[k] for u in updates]).mean(0) for k in TEMPLATE}
    for name in TEMPLATE:
        assert torch.allclose(clip.mean()[name], mean[name], atol=1e-6)


def test_centered_clipping_adapts_its_radius_and_refuses_bad_input() -> None:
    # No history: the running median of the distances so far; the first is not clipped.
    clip = CenteredClipSum(TEMPLATE, centre=None, radius=None)
    first = clip.add(_honest(0))
    assert clip.radius(first * 100) == pytest.approx((first + first * 100) / 2)
    assert clip.clipped == 0
    # The previous round's median distance, once there is one.
    history = RoundHistory()
    history.advance(_honest(1), [1.0, 2.0, 3.0])
    assert history.radius == 2.0
    aggregator = RoundAggregator(AggregationConfig(rule="centeredclip"), TEMPLATE,
                                 max_buffered=0, history=history)
    aggregator.add("a", _honest(2), 5)
    bad = _honest(3)
    bad["w"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="update from 'nan-node' tensor 'w' contains NaN"):
        aggregator.add("nan-node", bad, 5)
    outcome = aggregator.finish()
    assert outcome.used == ("a",) and len(outcome.distances) == 1
    with pytest.raises(ValueError, match="clip_radius must be a finite number > 0"):
        AggregationConfig(rule="centeredclip", clip_radius=-1.0)


def test_every_rule_states_its_cost_and_the_readme_shows_the_table() -> None:
    table = cost_table()
    readme = README.read_text()
    for name in rule_names():
        cost = rule_for(name).cost
        assert cost.startswith("memory:") and "time:" in cost
        assert f"| {name} |" in table
        assert re.search(rf"^\| {name} \| (yes|no) \| {re.escape(cost)} \|$", readme,
                         re.MULTILINE), f"README's cost table lacks {name} (cost_table())"
