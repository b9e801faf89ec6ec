"""Agents packed many to a process share their model through a pool: as many models as
tasks train at once, not one per agent; each task still trains from the global weights."""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from fedkube.runtime.agent.trainer import LocalTrainer, ModelPool
from fedkube.runtime.messages import JobIdentity
from fedkube.runtime.models import build_model
from fedkube.runtime.plan import plan_for
from fedkube.runtime.spec import FederatedJobSpec
from fedkube.runtime.training import weights_of


def test_a_pool_builds_only_as_many_models_as_are_borrowed_at_once() -> None:
    pool = ModelPool(lambda: build_model("mlp", input_shape=(1, 8, 8), num_classes=10))
    with pool.borrowed() as first:
        pass
    with pool.borrowed() as again:
        assert again is first and pool.created == 1
    inside, release = threading.Barrier(3), threading.Event()
    held: list[torch.nn.Module] = []

    def borrow() -> None:
        with pool.borrowed() as model:
            held.append(model)
            inside.wait(timeout=30)
            release.wait(timeout=30)

    threads = [threading.Thread(target=borrow) for _ in range(2)]
    for thread in threads:
        thread.start()
    inside.wait(timeout=30)
    assert pool.created == 2 and held[0] is not held[1]  # two at once: two models
    release.set()
    for thread in threads:
        thread.join()


def test_agents_of_one_process_share_models_and_train_from_the_global_weights(
        tmp_path: Path) -> None:
    spec = FederatedJobSpec.model_validate({
        "model": "mlp", "data": {"dataset": "digits", "limit": 200}, "batchSize": 16,
        "learningRate": 0.1, "simulation": {"clients": 50}, "seed": 7})
    identity = JobIdentity(job_name="pool", model=spec.model, data=spec.data, seed=spec.seed,
                           num_simulated_clients=50, input_shape=(1, 8, 8), num_classes=10)
    trainers = [LocalTrainer.create(job=identity, node_id=f"n{i}", device=torch.device("cpu"),
                                    simulated_index=i, data_path=None, state_dir=tmp_path)
                for i in range(20)]
    assert len({id(t.models) for t in trainers}) == 1
    assert trainers[0].models.created == 1  # not 20
    plan = plan_for(spec, round=1, model_version=0, now=0.0, client_parameters={})
    start = {k: torch.zeros_like(v) for k, v in weights_of(trainers[0].model).items()}
    first = trainers[0].train(plan, start).delta_weights
    trainers[1].train(plan, {k: v + 1 for k, v in start.items()})  # leaves the model moved
    again = trainers[0].train(plan, start).delta_weights  # from `start`, not from there
    for name, value in first.items():
        torch.testing.assert_close(again[name], value)
