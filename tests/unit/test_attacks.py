"""Attack drills (agent/attacks.py): what each kind does to an honest update, and that a
simulated client runs one only when the round's plan names it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fedkube.runtime.agent import attacks
from fedkube.runtime.agent.trainer import LocalTrainer
from fedkube.runtime.messages import JobIdentity
from fedkube.runtime.plan import attack_plan, plan_for
from fedkube.runtime.spec import ManifestError, parse_job_spec
from fedkube.runtime.training import weights_of

Weights = dict[str, torch.Tensor]


def _update(seed: int) -> Weights:
    generator = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, 3, generator=generator), "b": torch.randn(3, generator=generator)}


def _flat(update: Weights) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(torch.float64) for t in update.values()])


def test_signflip_and_scaling_multiply_the_honest_update() -> None:
    honest = _update(0)
    flipped = attacks.sign_flip(honest, 5.0)
    boosted = attacks.scaled(honest, 50.0)
    for name in honest:
        assert torch.equal(flipped[name], honest[name] * -5.0)
        assert torch.equal(boosted[name], honest[name] * 50.0)
    assert torch.equal(honest["w"], _update(0)["w"])  # the input is left alone


def test_noise_replaces_the_update_with_gaussian_noise_of_the_given_std() -> None:
    honest = {"w": torch.full((200, 50), 7.0)}
    noisy = attacks.gaussian_noise(honest, 2.0, torch.Generator().manual_seed(1))
    assert noisy["w"].shape == (200, 50)
    assert abs(float(noisy["w"].mean())) < 0.05
    assert float(noisy["w"].std()) == pytest.approx(2.0, rel=0.03)


def test_labelflip_maps_the_given_share_of_labels_to_their_mirror_class() -> None:
    labels = np.arange(100) % 10
    flipped = attacks.flip_labels(labels, 10, 1.0, np.random.default_rng(0))
    assert np.array_equal(flipped, 9 - labels)
    half = attacks.flip_labels(labels, 10, 0.5, np.random.default_rng(0))
    assert int((half != labels).sum()) == 50  # no class is its own mirror with 10 classes
    with pytest.raises(ValueError, match="share of labels"):
        attacks.flip_labels(labels, 10, 1.5, np.random.default_rng(0))


def test_lie_sits_z_standard_deviations_below_the_colluders_mean() -> None:
    honest = [_update(seed) for seed in range(4)]
    z = 0.7
    lie = attacks.little_is_enough(honest, z)
    for name in honest[0]:
        stack = torch.stack([u[name] for u in honest]).to(torch.float64)
        expected = stack.mean(0) - z * stack.std(0, unbiased=False)
        assert torch.allclose(lie[name].to(torch.float64), expected, atol=1e-6)
    # Baruch et al.'s z for 20 clients of which 4 attack: s = 7, z = Phi^-1(13/20).
    assert attacks.lie_z(20, 4) == pytest.approx(0.3853, abs=1e-3)
    with pytest.raises(ValueError, match="0 < attackers < clients"):
        attacks.lie_z(4, 4)


def test_ipm_points_against_the_colluders_mean() -> None:
    honest = [_update(seed) for seed in range(4)]
    ipm = attacks.inner_product_manipulation(honest, 0.5)
    mean = torch.stack([_flat(u) for u in honest]).mean(0)
    assert torch.allclose(_flat(ipm), -0.5 * mean, atol=1e-6)
    assert float(_flat(ipm) @ mean) < 0  # the aggregate's inner product turns negative


def test_poisoned_picks_the_kind_and_defaults_come_from_the_catalogue() -> None:
    honest = _update(3)
    generator = torch.Generator().manual_seed(0)
    for kind in attacks.KINDS:
        strength = attacks.strength_of(kind, None, clients=20, attackers=4)
        out = attacks.poisoned(kind, strength, own=honest, colluders=[honest, _update(4)],
                               generator=generator)
        assert set(out) == set(honest) and all(out[n].shape == honest[n].shape for n in honest)
    assert attacks.strength_of("signflip", None, clients=20, attackers=4) == 5.0
    assert attacks.strength_of("scaling", 3.0, clients=20, attackers=4) == 3.0
    with pytest.raises(ValueError, match="unknown attack kind 'mystery'"):
        attacks.strength_of("mystery", None, clients=20, attackers=4)


def test_the_drill_is_off_unless_the_manifest_sets_it_and_names_valid_settings() -> None:
    base = {"model": "mlp", "simulation": {"clients": 10}}
    assert attack_plan(parse_job_spec(base)) is None
    spec = parse_job_spec({**base, "simulation": {
        "clients": 10, "attackers": {"fraction": 0.2, "kind": "ipm"}}})
    plan = attack_plan(spec)
    assert plan is not None and plan.kind == "ipm" and len(plan.attackers) == 2
    assert plan == attack_plan(spec)  # the same attackers every round
    with pytest.raises(ManifestError, match="simulation.attackers needs simulated clients"):
        parse_job_spec({"model": "mlp", "simulation": {
            "attackers": {"fraction": 0.2, "kind": "noise"}}})
    with pytest.raises(ManifestError, match="spec.simulation.attackers.kind"):
        parse_job_spec({**base, "simulation": {
            "clients": 10, "attackers": {"fraction": 0.2, "kind": "bribe"}}})
    with pytest.raises(ManifestError, match="leaves no honest client"):
        parse_job_spec({**base, "simulation": {
            "clients": 2, "attackers": {"fraction": 0.9, "kind": "noise"}}})


def _trainers(tmp_path: Path, manifest: dict) -> tuple[LocalTrainer, LocalTrainer, object]:
    spec = parse_job_spec(manifest)
    identity = JobIdentity(job_name="j", model=spec.model, data=spec.data, seed=spec.seed,
                           num_simulated_clients=spec.simulation.clients,
                           input_shape=(1, 8, 8), num_classes=10)
    plan = plan_for(spec, round=1, model_version=0, now=0.0, client_parameters={})
    assert plan.attack is not None
    attacker, other = plan.attack.attackers[0], plan.attack.attackers[-1]
    made = [LocalTrainer.create(job=identity, node_id=f"n{i}", device=torch.device("cpu"),
                                simulated_index=i, data_path=None, state_dir=tmp_path)
            for i in (attacker, other)]
    return made[0], made[1], plan


def test_an_attacking_simulated_client_sends_the_poisoned_update(tmp_path: Path) -> None:
    manifest = {"model": "mlp", "data": {"dataset": "digits"}, "batchSize": 64,
                "simulation": {"clients": 4, "attackers": {"fraction": 0.5, "kind": "signflip",
                                                           "strength": 3.0}}}
    attacker, _, plan = _trainers(tmp_path, manifest)
    start = weights_of(attacker.model)
    honest_plan = plan_for(parse_job_spec({**manifest, "simulation": {"clients": 4}}), round=1,
                           model_version=0, now=0.0, client_parameters={})
    honest = attacker.train(honest_plan, start).delta_weights
    poisoned = attacker.train(plan, start).delta_weights
    for name in honest:
        assert torch.allclose(poisoned[name], -3.0 * honest[name], atol=1e-6)


def test_colluding_attackers_send_the_same_ipm_update(tmp_path: Path) -> None:
    manifest = {"model": "mlp", "data": {"dataset": "digits"}, "batchSize": 64,
                "simulation": {"clients": 4, "attackers": {"fraction": 0.5, "kind": "ipm"}}}
    first, second, plan = _trainers(tmp_path, manifest)
    start = weights_of(first.model)
    a = first.train(plan, start).delta_weights
    b = second.train(plan, start).delta_weights
    assert torch.allclose(_flat(a), _flat(b), atol=1e-5)  # they colluded
    assert float(_flat(a).norm()) > 0


def test_the_attack_drill_travels_whole_in_the_task() -> None:
    from fedkube.runtime.wire import convert

    spec = parse_job_spec({"model": "mlp", "simulation": {
        "clients": 10, "attackers": {"fraction": 0.3, "kind": "scaling", "strength": 7.0}}})
    plan = plan_for(spec, round=2, model_version=1, now=0.0, client_parameters={})
    back = convert.plan_from_pb(convert.plan_to_pb(plan))
    assert back.attack == plan.attack and back.attack is not None
    assert back.attack.strength == 7.0 and len(back.attack.attackers) == 3
    honest = plan_for(parse_job_spec({"model": "mlp"}), round=1, model_version=0, now=0.0,
                      client_parameters={})
    assert convert.plan_from_pb(convert.plan_to_pb(honest)).attack is None
