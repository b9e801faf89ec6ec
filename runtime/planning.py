"""`fedkube privacy plan JOB.yaml`: what a job's DP settings will cost, before it runs.

The budget is built exactly where the job builds it: central DP through the coordinator's
`CentralDP.for_job`, local DP through `Budget.local` with the TrainPlan's privacy settings
(`plan_for`) and a simulated client's real partition size, as the agent does. Local DP
plans for the smallest client: it samples the largest share of its data per step, so it
needs the most noise.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .plan import plan_for
from .spec import FederatedJob, FederatedJobSpec, ManifestError, load_job

if TYPE_CHECKING:
    # Imported where used: the privacy maths loads Opacus' accountants (seconds), and
    # `register` runs for every fedkube command.
    from .privacy.budget import Budget
    from .privacy.planner import PrivacyPlan

PLAN_PLOT = "privacy-plan.png"


def smallest_client_samples(spec: FederatedJobSpec) -> int:
    """Training examples of the job's smallest simulated client (one client: all)."""
    from .data.datasets import load_dataset
    from .data.partition import partition_indices

    dataset = load_dataset(spec.data, seed=spec.seed)
    clients = max(1, spec.simulation.clients)
    parts = partition_indices(dataset.y_train, clients, kind=spec.data.partition,
                              alpha=spec.data.alpha,
                              shards_per_client=spec.data.shards_per_client, seed=spec.seed)
    return min(len(part) for part in parts)


def budget_factory(spec: FederatedJobSpec, *, samples: int | None = None
                   ) -> Callable[[], Budget]:
    """A fresh budget as the job's coordinator (central) or agents (local) build it."""
    if spec.privacy.mode == "central":
        from .coordinator.central_dp import CentralDP

        return lambda: CentralDP.for_job(spec).budget
    if spec.privacy.mode == "local":
        privacy = plan_for(spec, round=1, model_version=0, now=0.0,
                           client_parameters={}).privacy
        count = samples if samples is not None else smallest_client_samples(spec)
        from .privacy.budget import Budget

        return lambda: Budget.local(
            samples=count, batch_size=spec.batch_size, local_epochs=spec.local_epochs,
            planned_rounds=privacy.planned_rounds, target_epsilon=privacy.target_epsilon,
            delta=privacy.delta, accountant=privacy.accountant,
            noise_multiplier=privacy.noise_multiplier)
    raise ManifestError("spec.privacy.mode: the job has no differential privacy to plan "
                        "(mode is 'none')")


def plan_job(spec: FederatedJobSpec, *, samples: int | None = None) -> PrivacyPlan:
    from .privacy.planner import plan_budget

    try:
        return plan_budget(budget_factory(spec, samples=samples),
                           accountant=spec.privacy.accountant)
    except ValueError as error:  # the target cannot be met at any noise
        if isinstance(error, ManifestError):
            raise
        raise ManifestError(f"spec.privacy.targetEpsilon: {error}") from error


# --utility: a few noise levels, relative to the planned one.
TRIAL_FACTORS: tuple[float, ...] = (0.5, 1.0, 2.0)


@dataclass(frozen=True)
class TrialPoint:
    noise_multiplier: float
    rounds: int
    accuracy: float | None  # the global model's test accuracy after the trial
    epsilon_trial: float | None  # spent in the trial
    epsilon_full_job: float  # the whole job would spend at this noise


def trial_spec(spec: FederatedJobSpec, *, noise_multiplier: float, rounds: int,
               sample: int) -> FederatedJobSpec:
    """The job at a fixed noise, for `rounds` rounds on `sample` training examples (no
    target: the trial shows what the noise costs instead of stopping at the budget)."""
    wire = spec.model_dump(by_alias=True, mode="json")
    wire["rounds"] = min(rounds, spec.rounds)
    wire["data"]["limit"] = sample
    wire["privacy"] = {**wire["privacy"], "noiseMultiplier": noise_multiplier,
                       "targetEpsilon": None}
    wire["convergence"] = {}
    wire["tracking"] = {}
    return FederatedJobSpec.model_validate(wire)


def utility_trial(job: FederatedJob, plan: PrivacyPlan, *, rounds: int, sample: int,
                  factors: Sequence[float] = TRIAL_FACTORS) -> list[TrialPoint]:
    """Run the job (`fedkube run`'s coordinator and simulated agents) briefly at a few
    noise levels; each point pairs the accuracy reached with the epsilon it costs."""
    from .local import RunOptions, run_job
    from .privacy.analysis import epsilon_for

    if job.spec.simulation.clients < 1:
        raise ManifestError("spec.simulation.clients: --utility trains simulated clients; "
                            "set at least 1")
    points = []
    for factor in factors:
        noise = plan.noise_multiplier * factor
        spec = trial_spec(job.spec, noise_multiplier=noise, rounds=rounds, sample=sample)
        trial = job.model_copy(update={"spec": spec})
        with tempfile.TemporaryDirectory(prefix="fedkube-plan-") as folder:
            summary = asyncio.run(run_job(trial, RunOptions(output=Path(folder), quiet=True,
                                                            agent_processes=1)))
        points.append(TrialPoint(
            noise_multiplier=noise, rounds=int(summary["rounds"]),
            accuracy=_figure(summary, "final_accuracy", "finalAccuracy"),
            epsilon_trial=_figure(summary, "epsilon", "epsilon"),
            epsilon_full_job=epsilon_for(
                noise_multiplier=noise, sample_rate=plan.sample_rate,
                steps=plan.planned_rounds * plan.steps_per_round, delta=plan.delta,
                accountant=job.spec.privacy.accountant)))
    return points


def _figure(summary: dict[str, object], snake: str, camel: str) -> float | None:
    # summary.json's keys are moving to camelCase; read either spelling.
    value = summary.get(camel, summary.get(snake))
    return None if value is None else float(value)  # type: ignore[arg-type]


def format_trial(points: Sequence[TrialPoint], *, sample: int) -> str:
    lines = [f"utility trial ({sample} training examples):",
             "noise   rounds  accuracy  epsilon (trial)  epsilon (full job)"]
    for p in points:
        accuracy = "-" if p.accuracy is None else f"{p.accuracy:.4f}"
        trial = "-" if p.epsilon_trial is None else f"{p.epsilon_trial:.4f}"
        lines.append(f"{p.noise_multiplier:6.3f}  {p.rounds:6d}  {accuracy:>8}  {trial:>15}"
                     f"  {p.epsilon_full_job:18.4f}")
    return "\n".join(lines)


def plot_plan(plan: PrivacyPlan, path: Path, *, title: str,
              trial: Sequence[TrialPoint] = ()) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2 if trial else 1, figsize=(14 if trial else 8, 5),
                                squeeze=False)
    axis = axes[0][0]
    rounds = range(1, len(plan.epsilon_by_round) + 1)
    axis.plot(rounds, plan.epsilon_by_round, marker="o",
              label=f"noise {plan.noise_multiplier:.3f} (planned)")
    if plan.target_epsilon is not None:
        axis.axhline(plan.target_epsilon, linestyle="--", color="black",
                     label=f"target ε {plan.target_epsilon:g}")
    axis.set(title=f"{title}: privacy spent per round", xlabel="round",
             ylabel=f"ε spent (δ = {plan.delta:g})", ylim=(0, None))
    axis.grid(alpha=0.3)
    axis.legend()
    if trial:
        utility = axes[0][1]
        measured = [p for p in trial if p.accuracy is not None]
        utility.plot([p.epsilon_full_job for p in measured], [p.accuracy for p in measured],
                     marker="o")
        for p in measured:
            utility.annotate(f"noise {p.noise_multiplier:.2f}",
                             (p.epsilon_full_job, p.accuracy), textcoords="offset points",
                             xytext=(5, 5))
        if plan.target_epsilon is not None:
            utility.axvline(plan.target_epsilon, linestyle="--", color="black",
                            label=f"target ε {plan.target_epsilon:g}")
            utility.legend()
        utility.set(title="Utility trial: accuracy against privacy",
                    xlabel="ε the whole job would spend", ylabel="test accuracy after trial",
                    ylim=(0, 1.02))
        utility.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def cmd_privacy_plan(args: argparse.Namespace) -> int:
    from .privacy.planner import format_plan

    job = load_job(args.job)
    plan = plan_job(job.spec)
    print(format_plan(plan, mode=job.spec.privacy.mode))
    trial: list[TrialPoint] = []
    if args.utility:
        trial = utility_trial(job, plan, rounds=args.utility_rounds, sample=args.sample)
        print()
        print(format_trial(trial, sample=args.sample))
    if args.plot:
        print(f"wrote {plot_plan(plan, Path(args.plot), title=job.metadata.name, trial=trial)}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    privacy = commands.add_parser("privacy", help="plan a job's differential privacy")
    actions = privacy.add_subparsers(dest="privacy_command", required=True, metavar="ACTION")
    plan = actions.add_parser("plan", help="noise, epsilon per round and rounds the budget "
                              "allows, as the job will compute them")
    plan.add_argument("job", help="FederatedJob manifest (YAML)")
    plan.add_argument("--plot", nargs="?", const=PLAN_PLOT, metavar="PNG",
                      help=f"also draw epsilon per round (default file {PLAN_PLOT})")
    plan.add_argument("--utility", action="store_true",
                      help="also run the job briefly at a few noise levels (accuracy "
                      "against epsilon)")
    plan.add_argument("--utility-rounds", type=int, default=3,
                      help="rounds of each utility trial (default 3)")
    plan.add_argument("--sample", type=int, default=600,
                      help="training examples the utility trial uses (default 600)")
    plan.set_defaults(func=cmd_privacy_plan)
