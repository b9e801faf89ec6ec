"""How fast the coordinator aggregates, beside baselines measured in the same run.

N client updates of P float32 parameters (default: the issue's case, 50 updates of a
11.7M-parameter model, ResNet-18's size) are made once, in memory, and then:

- read limit: `torch.sum` over every tensor of every update (the same bytes, the same
  thread count): the fastest anything that reads each update once can go.
- float32 add_ loop: `acc.add_(update, alpha=w)` into a float32 sum, no checks: not
  float64-grade, but the least memory traffic any fold that keeps a sum can have (read
  the update, read and write the sum), so the practical ceiling beside the read limit.
- fold: fedkube's FedAvg as the coordinator runs it when updates wait for the fold (50
  clients uploading at once): a fedavg `RoundAggregator` with the engine's
  `hold=FOLD_TOGETHER - 1`, fed batches of `FOLD_TOGETHER` (8) and flushed after each,
  as `Round.fold` does with the deltas waiting for its lock: each update checked for
  NaN/Inf and measured (its norm) in one read, then the batch folded in one pass over
  the float64 sum, then the mean. GB/s counts update bytes. "fold, one at a time" is
  the same with `hold=0` (updates arriving spaced out: each folded before the next).
  "from round 2": the batched fold with a previous aggregate, whose cosine to each
  update the anomaly scores take (from the check's read: the previous aggregate is read
  beside each update).
- Threads: torch's figures use `--threads`; fedkube's compiled loops (numba) always run
  on one thread, so only `--threads 1` (the default) compares like with like. The
  thread counts `runtime/threads.py` gives the coordinator, `fedkube run` and an agent
  on this machine (and `FEDKUBE_TORCH_THREADS` if set) are printed and kept in the JSON.
- Flower: `flwr.server.strategy.aggregate.aggregate` on the same updates as numpy
  arrays, when `flwr` is importable (null otherwise, with a note). A faithful copy of
  Flower's function (`flower_style_*`, numpy, from framework/py/flwr/server/strategy/
  aggregate.py) is timed in every run, so the comparison exists without flwr too.
- median and trimmed mean (beta 0.1): fedkube's, and Flower-style (`np.median`,
  `np.partition` as Flower's `aggregate_median` / `_trim_mean`), each as a multiple of
  fedkube's FedAvg.
- peak memory: resident memory (VmHWM, reset through /proc/self/clear_refs) that one
  fold adds, over the model's size. torch's allocations are invisible to tracemalloc.

The fold's accuracy is checked against a float64 reference on the same data.

    python -P bench/aggregation.py                        # 50 x 11.7M, 1 thread
    python -P bench/aggregation.py --quick                # 10 x 2M, best of 2
    python -P bench/aggregation.py --threads 2 --output aggregation.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any, Self

import numpy as np
import torch
from fedkube.runtime.aggregation import (
    AggregationConfig,
    RoundAggregator,
    RoundHistory,
    coordinate_median,
    trimmed_mean,
)
from fedkube.runtime.coordinator.round import FOLD_TOGETHER
from fedkube.runtime.threads import ENV_VAR, choose_torch_threads, usable_cpus

Weights = dict[str, torch.Tensor]


def layout_for(params: int) -> dict[str, tuple[int, ...]]:
    """A model of about `params` parameters shaped like a CNN: a few large weight tensors
    and many small biases and norms (so per-tensor overheads show as they would)."""
    shapes: dict[str, tuple[int, ...]] = {}
    big = params * 9 // 10
    for index, share in enumerate((0.4, 0.3, 0.2, 0.1)):
        shapes[f"conv{index}.weight"] = (max(1, int(big * share)),)
    small = max(0, params - sum(s[0] for s in shapes.values()))
    for index in range(40):
        shapes[f"layer{index}.bias"] = (max(1, small // 40),)
    return shapes


def make_updates(count: int, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> list[Weights]:
    generator = torch.Generator().manual_seed(seed)
    return [{name: 0.01 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}
            for _ in range(count)]


def best_of(repeats: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved_best(repeats: int, runs: dict[str, Callable[[], object]]) -> dict[str, float]:
    """The best time of each run over `repeats` rounds that take every run in turn: on a
    machine whose load moves within seconds, runs timed minutes apart are not comparable,
    runs timed side by side are."""
    best = {name: math.inf for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            gc.collect()
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def read_all(updates: list[Weights]) -> float:
    return float(sum(float(tensor.sum()) for update in updates for tensor in update.values()))


def float32_add_loop(updates: list[Weights]) -> Weights:
    sums = {name: torch.zeros_like(tensor) for name, tensor in updates[0].items()}
    for index, update in enumerate(updates):
        for name, tensor in update.items():
            sums[name].add_(tensor, alpha=100 + index)
    return sums


def fold(updates: list[Weights], batch: int = FOLD_TOGETHER,
         previous: Weights | None = None) -> Weights:
    """The coordinator's fold of `updates` arriving `batch` at a time (1: one at a time);
    with `previous`, as in every round after the first: each update's anomaly cosine to
    that aggregate too."""
    aggregator = RoundAggregator(AggregationConfig(rule="fedavg"), updates[0], max_buffered=0,
                                 hold=batch - 1, history=RoundHistory(centre=previous))
    for index, update in enumerate(updates):
        aggregator.add(f"node-{index}", update, 100 + index)
        if (index + 1) % batch == 0:
            aggregator.flush()
    return aggregator.finish().mean_delta


def thread_choices() -> dict[str, object]:
    """What `runtime/threads.py` gives each role here (the coordinator's fold must not
    fight its own event loop or the agents for cores: module doc there)."""
    cpus = usable_cpus()
    ceiling = torch.get_num_threads()
    chosen = {role: choose_torch_threads(role, cpus=cpus, env=os.environ, ceiling=ceiling)
              for role in ("coordinator", "local", "agent")}
    return {"usable_cpus": cpus, "torch_default_threads": ceiling,
            "override": os.environ.get(ENV_VAR) or None, **{f"{r}_threads": n for r, n in chosen.items()}}


def flower_style_aggregate(results: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """Flower's `aggregate` (framework/py/flwr/server/strategy/aggregate.py), verbatim
    apart from names."""
    num_examples_total = sum(num_examples for (_, num_examples) in results)
    weighted_weights = [[layer * num_examples for layer in weights] for weights, num_examples in results]
    return [
        np.sum(layer_updates, axis=0) / num_examples_total for layer_updates in zip(*weighted_weights)
    ]


def flower_style_median(results: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """Flower's `aggregate_median`."""
    weights_list = [weights for weights, _ in results]
    return [np.median(np.asarray(layer), axis=0) for layer in zip(*weights_list)]


def flower_style_trimmed_mean(results: list[tuple[list[np.ndarray], int]], beta: float) -> list[np.ndarray]:
    """Flower's `aggregate_trimmed_avg` and its `_trim_mean`."""
    weights_list = [weights for weights, _ in results]
    out = []
    for layer in zip(*weights_list):
        array = np.asarray(layer)
        lowercut = int(beta * array.shape[0])
        uppercut = array.shape[0] - lowercut
        ordered = np.partition(array, (lowercut, uppercut - 1), 0)
        out.append(np.mean(ordered[lowercut:uppercut], axis=0))
    return out


def flower_aggregate() -> tuple[Callable[..., Any] | None, str]:
    try:
        from flwr.server.strategy.aggregate import aggregate
    except ImportError as error:
        return None, (f"flwr is not importable here ({error}; flwr 1.4x pins protobuf below 7, "
                      "which fedkube's stubs need today); flower_aggregate_gb_per_s is null. "
                      "flower_style_* time a copy of Flower's function instead.")
    return aggregate, "flwr's own aggregate"


class PeakMemory:
    """Resident memory added at the peak of a block (Linux: VmHWM after a reset)."""

    def __enter__(self) -> Self:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        self.before = self._kb("VmRSS") * 1024
        return self

    def __exit__(self, *_: object) -> None:
        self.added = max(0, self._kb("VmHWM") * 1024 - self.before)

    @staticmethod
    def _kb(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"{field} not in /proc/self/status")


def fold_error(updates: list[Weights], mean: Weights) -> float:
    """Largest difference between the fold and a float64 reference, in float32 ulps."""
    weights = [100 + index for index in range(len(updates))]
    worst = 0.0
    for name in mean:
        reference = sum(w * u[name].double() for w, u in zip(weights, updates, strict=True)) / sum(weights)
        ulp = torch.finfo(torch.float32).eps * reference.abs().clamp_min(1e-30)
        worst = max(worst, float(((mean[name].double() - reference).abs() / ulp).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=50, help="client updates per round")
    parser.add_argument("--params", type=float, default=11.7e6, help="parameters per update")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (both sides)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="best of this many rounds, each timing every fedkube figure, "
                             "the read limit and Flower-style aggregate in turn")
    parser.add_argument("--robust-repeats", type=int, default=1,
                        help="best of this many (Flower-style median and trimmed mean)")
    parser.add_argument("--beta", type=float, default=0.1, help="trimmed mean's beta")
    parser.add_argument("--quick", action="store_true", help="10 updates of 2M, best of 2")
    parser.add_argument("--output", help="write the figures as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.updates, args.params, args.repeats = 10, 2e6, 2
    threads = thread_choices()  # before --threads changes torch's count
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    shapes = layout_for(int(args.params))
    updates = make_updates(args.updates, shapes)
    model_bytes = sum(t.numel() * t.element_size() for t in updates[0].values())
    total_gb = args.updates * model_bytes / 1e9
    as_numpy = [([t.numpy() for t in update.values()], 100 + i) for i, update in enumerate(updates)]

    # Compile (or load from numba's cache) the kernels before anything is timed.
    tiny = [{name: t[:1].clone() for name, t in u.items()} for u in updates[:15]]
    for batch in (1, 2, 4, 8, 15):
        fold(tiny, batch=batch)
    coordinate_median(tiny)
    trimmed_mean(tiny, beta=args.beta)
    # First, before anything else allocates: memory freed later stays resident in the
    # allocator's pools and would hide what the fold adds.
    with PeakMemory() as peak:
        mean = fold(updates)
    error_ulps = fold_error(updates, mean)
    previous = mean  # the last round's aggregate, for the round-2 figure
    flwr_aggregate, flower_note = flower_aggregate()
    runs: dict[str, Callable[[], object]] = {
        "read": lambda: read_all(updates),
        "add_loop": lambda: float32_add_loop(updates),
        "fold": lambda: fold(updates),
        "single": lambda: fold(updates, batch=1),
        "later_round": lambda: fold(updates, previous=previous),
        "flower_style": lambda: flower_style_aggregate(as_numpy),
        "median": lambda: coordinate_median(updates),
        "trimmed": lambda: trimmed_mean(updates, beta=args.beta),
    }
    if flwr_aggregate is not None:
        runs["flower"] = lambda: flwr_aggregate(as_numpy)
    best = interleaved_best(args.repeats, runs)
    read_s, add_loop_s, fold_s, single_s = (best[k] for k in ("read", "add_loop", "fold", "single"))
    flower_s, flower_style_s = best.get("flower"), best["flower_style"]
    median_s, trimmed_s = best["median"], best["trimmed"]
    flower_median_s = best_of(args.robust_repeats, lambda: flower_style_median(as_numpy))
    flower_trimmed_s = best_of(args.robust_repeats, lambda: flower_style_trimmed_mean(as_numpy, args.beta))

    figures = {
        "updates": args.updates, "params": sum(t.numel() for t in updates[0].values()),
        "threads": args.threads, "compiled_loop_threads": 1, "model_bytes": model_bytes,
        "fold_seconds": fold_s, "fold_gb_per_s": total_gb / fold_s,
        "read_limit_gb_per_s": total_gb / read_s,
        "float32_add_loop_gb_per_s": total_gb / add_loop_s,
        "fold_over_read_limit": read_s / fold_s,
        "fold_batch": FOLD_TOGETHER,
        "fold_one_at_a_time_gb_per_s": total_gb / single_s,
        "fold_one_at_a_time_over_read_limit": read_s / single_s,
        "fold_later_round_gb_per_s": total_gb / best["later_round"],
        "fold_later_round_over_read_limit": read_s / best["later_round"],
        "fold_error_float32_ulps": error_ulps,
        "flower_aggregate_gb_per_s": total_gb / flower_s if flower_s else None,
        "flower_note": flower_note,
        "flower_style_aggregate_gb_per_s": total_gb / flower_style_s,
        "fold_over_flower_style": flower_style_s / fold_s,
        "median_seconds": median_s, "trimmedmean_seconds": trimmed_s,
        "median_over_fedavg": median_s / fold_s,
        "trimmedmean_over_fedavg": trimmed_s / fold_s,
        "median_over_fedavg_one_at_a_time": median_s / single_s,
        "trimmedmean_over_fedavg_one_at_a_time": trimmed_s / single_s,
        "flower_style_median_over_fedkube": flower_median_s / median_s,
        "flower_style_trimmedmean_over_fedkube": flower_trimmed_s / trimmed_s,
        "flower_style_median_seconds": flower_median_s,
        "flower_style_trimmedmean_seconds": flower_trimmed_s,
        "peak_memory_over_model": peak.added / model_bytes,
        "load_average": os.getloadavg()[0],
        **threads,
    }
    print(f"{args.updates} updates x {figures['params'] / 1e6:.1f}M params "
          f"({total_gb:.2f} GB), {args.threads} thread(s)")
    print(f"  read limit (torch.sum)      {figures['read_limit_gb_per_s']:6.2f} GB/s")
    print(f"  float32 add_ loop (no checks, float32-grade) "
          f"{figures['float32_add_loop_gb_per_s']:6.2f} GB/s")
    print(f"  fedkube FedAvg fold, {FOLD_TOGETHER} waiting "
          f"{figures['fold_gb_per_s']:6.2f} GB/s "
          f"({figures['fold_over_read_limit']:.0%} of the read limit, "
          f"error <= {error_ulps:.2f} float32 ulp)")
    print(f"  ... from round 2 (+ cosine to the last aggregate) "
          f"{figures['fold_later_round_gb_per_s']:6.2f} GB/s "
          f"({figures['fold_later_round_over_read_limit']:.0%} of the read limit)")
    print(f"  fedkube FedAvg fold, one at a time "
          f"{figures['fold_one_at_a_time_gb_per_s']:6.2f} GB/s "
          f"({figures['fold_one_at_a_time_over_read_limit']:.0%} of the read limit)")
    flower = figures["flower_aggregate_gb_per_s"]
    print(f"  Flower aggregate            {'  n/a' if flower is None else f'{flower:6.2f}'} GB/s"
          f"  ({flower_note})")
    print(f"  Flower-style aggregate      {figures['flower_style_aggregate_gb_per_s']:6.2f} GB/s "
          f"(fedkube {figures['fold_over_flower_style']:.1f}x faster)")
    print(f"  median                      {median_s:6.2f} s = "
          f"{figures['median_over_fedavg_one_at_a_time']:.1f}x FedAvg one at a time, "
          f"{figures['median_over_fedavg']:.1f}x batched (Flower-style {flower_median_s:.2f} s)")
    print(f"  trimmed mean (beta {args.beta})    {trimmed_s:6.2f} s = "
          f"{figures['trimmedmean_over_fedavg_one_at_a_time']:.1f}x FedAvg one at a time, "
          f"{figures['trimmedmean_over_fedavg']:.1f}x batched "
          f"(Flower-style {flower_trimmed_s:.2f} s)")
    print(f"  fold peak memory            {figures['peak_memory_over_model']:6.2f} x the model")
    print(f"  threads (runtime/threads.py, {threads['usable_cpus']} usable CPUs): coordinator "
          f"{threads['coordinator_threads']}, fedkube run {threads['local_threads']}, agent "
          f"{threads['agent_threads']} (torch's default {threads['torch_default_threads']}; "
          f"{ENV_VAR}={threads['override'] or 'unset'}); load average "
          f"{figures['load_average']:.1f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(figures, f, indent=2)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
