"""The examples carry the settings the benchmarks measured: bench/overhead.py's fedkube row
is examples/mnist-fedavgm.yaml, and its accuracy figures hold for that manifest."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from fedkube.runtime.aggregation import server_optimizer_for
from fedkube.runtime.coordinator.strategy import aggregation_config
from fedkube.runtime.spec import load_job

REPO = Path(__file__).resolve().parents[2]


def _overhead_bench():
    spec = importlib.util.spec_from_file_location("bench_overhead", REPO / "bench" / "overhead.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_the_overhead_bench_runs_the_mnist_fedavgm_example() -> None:
    bench = _overhead_bench()
    config = bench.config_from(bench.parse_args([]))
    measured = bench.build_job(config).spec
    example = load_job(REPO / "examples" / "mnist-fedavgm.yaml").spec
    fields = ("model", "data", "rounds", "clients_per_round", "local_epochs", "batch_size",
              "learning_rate", "optimizer", "strategy", "seed")
    assert {f: getattr(example, f) for f in fields} == {f: getattr(measured, f) for f in fields}
    assert example.simulation.clients == measured.simulation.clients == 10
    # Equal epochs: the central side trains rounds x local epochs.
    assert config.epochs == example.rounds * example.local_epochs


def test_the_examples_server_step_is_fedavgm() -> None:
    for name in ("mnist-fedavgm", "digits-fedavg"):
        strategy = load_job(REPO / "examples" / f"{name}.yaml").spec.strategy
        server = server_optimizer_for(aggregation_config(strategy))
        assert (server.config.name, server.config.momentum,
                server.config.learning_rate) == ("fedavgm", 0.5, 2.0), name
