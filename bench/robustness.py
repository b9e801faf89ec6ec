"""Byzantine clients against each aggregation rule, beside the clean FedAvg run measured
in the same run (issue 14).

20 simulated clients on mnist5k (IID), 20% of them attackers, 20 rounds, every client in
every round. For each attack drill (spec.simulation.attackers: signflip, scaling, noise,
labelflip, lie, ipm) and each rule (fedavg, the robust rules with byzantine = 4, and
centeredclip): the final test accuracy, and the highest suspicion any honest client
reached. Then, for each attack, FedAvg and centered clipping with quarantine on
(robustness.quarantineThreshold): quarantine precision and recall (clients ever
quarantined against the attackers) and the final accuracy.

What runs is fedkube's own code: the agents' LocalTrainer (attack drills included, from
the round's TrainPlan), the coordinator's RoundAggregator (anomaly scores, centered
clipping, the robust rules), its server step, suspicion and quarantine. What does not
run is gRPC and the agent processes: the 55 jobs would take an hour through
`fedkube run` here; tests/integration/test_byzantine.py drives the same pieces through
the real engine, real agents and real gRPC. Admission's relative norm bound is off
(normBoundFactor null), so the rules themselves are measured: with it on, scaling and
noise updates are refused before any rule sees them.

    python -P bench/robustness.py --output robustness.json
    python -P bench/robustness.py --quick    # 5 rounds, two attacks, three rules
    python -P bench/robustness.py --rounds 10 --rules fedavg,median,multikrum,centeredclip
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fedkube.runtime.agent.trainer import LocalTrainer
from fedkube.runtime.aggregation import (
    RoundAggregator,
    RoundHistory,
    minimum_updates,
    rule_for,
    server_optimizer_for,
)
from fedkube.runtime.coordinator.anomaly import fold_scores
from fedkube.runtime.coordinator.quarantine import Quarantine
from fedkube.runtime.coordinator.registry import ClientRegistry
from fedkube.runtime.coordinator.strategy import aggregation_config
from fedkube.runtime.data import load_dataset
from fedkube.runtime.messages import JobIdentity, NodeFacts, Registration
from fedkube.runtime.models import build_model
from fedkube.runtime.plan import attack_plan, plan_for
from fedkube.runtime.spec import FederatedJobSpec, parse_job_spec
from fedkube.runtime.training import evaluate, load_weights, weights_of

ATTACKS = ("signflip", "scaling", "noise", "labelflip", "lie", "ipm")
RULES = ("fedavg", "krum", "multikrum", "median", "trimmedmean", "bulyan", "centeredclip")
QUARANTINE_RULES = ("fedavg", "centeredclip")


def job_spec(args: argparse.Namespace, *, rule: str, attack: str | None,
             quarantine: bool) -> FederatedJobSpec:
    manifest: dict[str, Any] = {
        "model": args.model, "data": {"dataset": "mnist5k", "partition": "iid"},
        "rounds": args.rounds, "clientsPerRound": args.clients, "minClients": 1,
        "localEpochs": 1, "batchSize": 32, "learningRate": args.learning_rate,
        "strategy": {"name": rule, "byzantine": args.byzantine, "trimBeta": 0.2},
        "admission": {"normBoundFactor": None},
        "robustness": {"quarantineThreshold": args.threshold if quarantine else None,
                       "quarantineRounds": args.quarantine_rounds},
        "simulation": {"clients": args.clients},
        "seed": args.seed,
    }
    if attack is not None:
        manifest["simulation"]["attackers"] = {"fraction": args.fraction, "kind": attack}
    return parse_job_spec(manifest)


@dataclass
class Outcome:
    accuracy: float
    honest_suspicion: float  # the highest any honest client reached
    attacker_suspicion: float  # the lowest final suspicion among attackers
    quarantined: set[int]
    failed: str | None = None


class Simulation:
    """The job's clients, built once and reused by every scenario (each round seeds
    their training, so every scenario sees the same honest updates)."""

    def __init__(self, args: argparse.Namespace) -> None:
        spec = job_spec(args, rule="fedavg", attack=None, quarantine=False)
        self.dataset = load_dataset(spec.data, seed=spec.seed)
        identity = JobIdentity(
            job_name="robustness", model=spec.model, data=spec.data, seed=spec.seed,
            num_simulated_clients=args.clients, input_shape=tuple(self.dataset.input_shape),
            num_classes=self.dataset.num_classes)
        self.trainers = [LocalTrainer.create(
            job=identity, node_id=f"sim-{i:03d}", device=torch.device("cpu"),
            simulated_index=i, data_path=None, state_dir=args.state_dir)
            for i in range(args.clients)]
        self.model = build_model(spec.model, input_shape=self.dataset.input_shape,
                                 num_classes=self.dataset.num_classes, seed=spec.seed)
        self.initial = weights_of(self.model)

    def run(self, spec: FederatedJobSpec) -> Outcome:
        config = aggregation_config(spec.strategy)
        registry = ClientRegistry(job="robustness", offline_after=1e9)
        for i, trainer in enumerate(self.trainers):
            registry.register(Registration(node_id=trainer.node_id, join_token="",
                                           facts=NodeFacts(num_samples=trainer.num_samples),
                                           simulated_index=i))
        quarantine = Quarantine(spec.robustness, registry)
        history = RoundHistory()
        server = server_optimizer_for(config)
        weights = {k: v.clone() for k, v in self.initial.items()}
        attack = attack_plan(spec)
        attackers = set(attack.attackers) if attack else set()
        index = {t.node_id: i for i, t in enumerate(self.trainers)}
        ever: set[int] = set()
        honest_peak = 0.0
        failed = None
        for number in range(1, spec.rounds + 1):
            quarantine.release(number - 1)
            chosen = [t for t in self.trainers if not registry.get(t.node_id).quarantined]
            if len(chosen) < minimum_updates(config):
                failed = f"round {number}: {len(chosen)} clients, {config.rule} needs " \
                         f"{minimum_updates(config)}"
                break
            plan = plan_for(spec, round=number, model_version=number - 1, now=time.time(),
                            client_parameters={})
            aggregator = RoundAggregator(
                config, weights, max_buffered=len(chosen) if rule_for(config.rule).buffered
                else 0, history=history)
            for trainer in chosen:
                result = trainer.train(plan, weights)
                aggregator.add(trainer.node_id, result.delta_weights, result.num_samples)
            outcome = aggregator.finish()
            weights = server.step(weights, outcome.mean_delta)
            history.advance(outcome.mean_delta, list(outcome.distances))
            fold_scores(registry, outcome.scores, decay=spec.robustness.suspicion_decay)
            quarantine.judge(number, dict(outcome.reasons))
            ever |= {index[n] for n in quarantine.held_ids()}
            honest_peak = max([honest_peak] + [c.suspicion for c in registry.all()
                                               if index[c.node_id] not in attackers])
        load_weights(self.model, weights)
        accuracy = evaluate(self.model, self.dataset.x_test, self.dataset.y_test,
                            device=torch.device("cpu")).accuracy
        attacker_final = min((registry.get(self.trainers[i].node_id).suspicion
                              for i in attackers), default=0.0)
        return Outcome(accuracy=float(accuracy), honest_suspicion=honest_peak,
                       attacker_suspicion=attacker_final, quarantined=ever, failed=failed)


def precision_recall(quarantined: set[int], attackers: set[int]) -> tuple[float | None, float]:
    """None for precision when no one was quarantined (nothing to be precise about)."""
    hit = len(quarantined & attackers)
    precision = hit / len(quarantined) if quarantined else None
    recall = hit / len(attackers) if attackers else 1.0
    return precision, recall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--byzantine", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--quarantine-rounds", type=int, default=5)
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--state-dir", default="/tmp/fedkube-bench-robustness")
    parser.add_argument("--output", help="write the figures as JSON here")
    parser.add_argument("--quick", action="store_true",
                        help="5 rounds, signflip and lie, fedavg median and centeredclip")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.attacks, args.rules = 5, "signflip,lie", "fedavg,median,centeredclip"
    torch.set_num_threads(args.threads)
    logging.getLogger("fedkube").setLevel(logging.ERROR)  # quarantine warnings: in the table
    args.state_dir = Path(args.state_dir)
    attacks = [a for a in args.attacks.split(",") if a]
    rules = [r for r in args.rules.split(",") if r]
    started = time.monotonic()
    simulation = Simulation(args)

    clean = simulation.run(job_spec(args, rule="fedavg", attack=None, quarantine=False))
    print(f"baseline: clean FedAvg, {args.clients} clients, {args.rounds} rounds: "
          f"accuracy {clean.accuracy:.4f}, highest honest suspicion {clean.honest_suspicion:.3f}",
          flush=True)
    table: dict[str, dict[str, Any]] = {}
    header = f"{'attack':<10}" + "".join(f"{r:>13}" for r in rules)
    print("\nfinal accuracy (quarantine off); in brackets the highest honest suspicion")
    print(header)
    for attack in ["none", *attacks]:
        row: dict[str, Any] = {}
        for rule in rules:
            out = clean if (attack, rule) == ("none", "fedavg") else simulation.run(job_spec(
                args, rule=rule, attack=None if attack == "none" else attack, quarantine=False))
            row[rule] = {"accuracy": round(out.accuracy, 4),
                         "honestSuspicionMax": round(out.honest_suspicion, 4),
                         "attackerSuspicionMin": round(out.attacker_suspicion, 4),
                         "failed": out.failed}
        table[attack] = row
        print(f"{attack:<10}" + "".join(
            f"{row[r]['accuracy']:>7.3f} ({row[r]['honestSuspicionMax']:.2f})" for r in rules),
            flush=True)

    print(f"\nquarantine (threshold {args.threshold}, {args.quarantine_rounds} rounds out)")
    print(f"{'attack':<10}{'rule':<14}{'precision':>10}{'recall':>8}{'accuracy':>10}"
          f"{'best defence':>30}{'vs clean':>10}")
    quarantine_rows: dict[str, dict[str, Any]] = {}
    for attack in attacks:
        quarantine_rows[attack] = {}
        spec = job_spec(args, rule="fedavg", attack=attack, quarantine=True)
        plan = attack_plan(spec)
        attackers = set(plan.attackers) if plan else set()
        for rule in QUARANTINE_RULES:
            if rule not in rules:
                continue
            out = simulation.run(job_spec(args, rule=rule, attack=attack, quarantine=True))
            precision, recall = precision_recall(out.quarantined, attackers)
            quarantine_rows[attack][rule] = {
                "precision": None if precision is None else round(precision, 3),
                "recall": round(recall, 3),
                "accuracy": round(out.accuracy, 4),
                "honestSuspicionMax": round(out.honest_suspicion, 4)}
        candidates = {f"{r}": v["accuracy"] for r, v in table[attack].items()}
        candidates |= {f"{r}+quarantine": v["accuracy"]
                       for r, v in quarantine_rows[attack].items()}
        best = max(candidates, key=candidates.__getitem__)
        for i, (rule, figures) in enumerate(quarantine_rows[attack].items()):
            tail = (f"{best + ' ' + format(candidates[best], '.3f'):>30}"
                    f"{candidates[best] - clean.accuracy:>+10.3f}") if i == 0 else ""
            shown = "-" if figures["precision"] is None else f"{figures['precision']:.2f}"
            print(f"{attack:<10}{rule:<14}{shown:>10}{figures['recall']:>8.2f}"
                  f"{figures['accuracy']:>10.3f}{tail}", flush=True)
        quarantine_rows[attack]["bestDefence"] = {"name": best, "accuracy": candidates[best],
                                                  "vsClean": round(candidates[best]
                                                                   - clean.accuracy, 4)}
    seconds = round(time.monotonic() - started, 1)
    print(f"\n{seconds}s in all")
    if args.output:
        with open(args.output, "w") as out_file:
            json.dump({"baseline": {"cleanFedAvgAccuracy": round(clean.accuracy, 4),
                                    "honestSuspicionMax": round(clean.honest_suspicion, 4)},
                       "settings": {k: str(v) for k, v in vars(args).items()},
                       "accuracy": table, "quarantine": quarantine_rows,
                       "seconds": seconds}, out_file, indent=2)
            out_file.write("\n")


if __name__ == "__main__":
    main()
