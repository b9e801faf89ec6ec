"""One client's local work for a round: load the global model, train on local data
(optionally with DP-SGD) as the round's TrainPlan says, and return the delta. No network
here, and no spec: the job's identity builds model and data, each plan drives a round."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import wire
from ..data import Dataset, client_data, load_dataset
from ..messages import JobIdentity
from ..models import build_model
from ..plan import AttackPlan, PrivacyPlan, TrainPlan
from ..training import load_weights, make_loader, make_optimizer, train_local, weights_of
from . import attacks
from .compressor import ResidualStore, UpdateCompressor
from .device import TrainingDevice

if TYPE_CHECKING:
    from ..privacy import Budget, BudgetStore

log = logging.getLogger("fedkube.agent")

Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrainOutcome:
    delta_weights: Weights
    num_samples: int
    metrics: dict[str, float]
    epsilon: float
    delta: float


@dataclass(frozen=True)
class Refusal:
    reason: str
    epsilon: float
    delta: float


class LocalPrivacy:
    """This device's DP-SGD budget for one job: calibrated on the first plan for every
    round the job plans, accounted as Opacus steps, persisted across agent restarts."""

    def __init__(self, *, store: BudgetStore, job: str, budget: Budget, max_grad_norm: float
                 ) -> None:
        self.store = store
        self.job = job
        self.budget = budget
        self.max_grad_norm = max_grad_norm

    @classmethod
    def open(cls, plan: PrivacyPlan, *, samples: int, batch_size: int, local_epochs: int,
             job: str, store: BudgetStore) -> LocalPrivacy:
        # Imported here: Opacus costs seconds of start-up that non-private jobs never need.
        from ..privacy import Budget

        budget = Budget.local(
            samples=samples, batch_size=batch_size, local_epochs=local_epochs,
            planned_rounds=plan.planned_rounds, target_epsilon=plan.target_epsilon,
            delta=plan.delta, accountant=plan.accountant, noise_multiplier=plan.noise_multiplier)
        saved = store.read(job)
        if saved is not None:
            budget.load_state_dict({**saved.extra, "accountant": saved.accountant.state_dict()})
            log.info("resuming privacy budget for %s: epsilon %.4f spent", job, budget.epsilon())
        if plan.delta >= 1.0 / max(1, samples):
            log.warning("privacy.delta %.2g is not below 1/dataset size (%d examples)",
                        plan.delta, samples)
        privacy = cls(store=store, job=job, budget=budget, max_grad_norm=plan.max_grad_norm)
        privacy.save()
        return privacy

    def follow(self, plan: PrivacyPlan) -> None:
        """The job's planned rounds changed (an edit of spec.rounds): spread what is left
        of the target over the rounds still to come."""
        if plan.planned_rounds != self.budget.planned_rounds:
            done = self.budget.accountant.total_steps // max(1, self.budget.mechanism.steps)
            try:
                self.budget.replan(plan.planned_rounds, rounds_done=done)
            except ValueError as error:  # nothing is left: the next round is refused
                log.warning("privacy budget for %s cannot stretch to %d rounds: %s",
                            self.job, plan.planned_rounds, error)
                self.budget.planned_rounds = plan.planned_rounds
            self.save()

    def epsilon(self) -> float:
        return self.budget.epsilon()

    def save(self) -> None:
        state = self.budget.state_dict()
        accountant = self.budget.accountant
        self.store.save(self.job, accountant, extra={k: v for k, v in state.items()
                                                     if k != "accountant"})


class ModelPool:
    """Models of one architecture, lent to a task while it trains. Agents packed many to a
    process (`fedkube run`) then hold no model each between tasks: as many models exist
    as tasks train at once (at most the executor's threads), not one per agent. Every
    task loads the global weights into the model it borrows, so which one it gets does
    not matter."""

    def __init__(self, build: Callable[[], torch.nn.Module]) -> None:
        self._build = build
        self._free: list[torch.nn.Module] = []
        self._lock = threading.Lock()
        self.created = 0

    @contextlib.contextmanager
    def borrowed(self) -> Iterator[torch.nn.Module]:
        with self._lock:
            model = self._free.pop() if self._free else None
        if model is None:
            model = self._build()
            with self._lock:
                self.created += 1
        try:
            yield model
        finally:
            with self._lock:
                self._free.append(model)

    def sample(self) -> torch.nn.Module:
        """A model of the pool to read its structure or copy (not to train in place)."""
        with self.borrowed() as model:
            return model


_POOLS: dict[tuple, ModelPool] = {}
_POOLS_LOCK = threading.Lock()


def model_pool(name: str, *, input_shape: tuple[int, ...], num_classes: int, seed: int
               ) -> ModelPool:
    """The process's pool for this architecture (shared by the agents it hosts)."""
    key = (name, tuple(input_shape), num_classes, seed)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = ModelPool(lambda: build_model(
                name, input_shape=input_shape,  # type: ignore[arg-type]
                num_classes=num_classes, seed=seed))
        return pool


class LocalTrainer:
    def __init__(self, *, job: JobIdentity, node_id: str, device: torch.device,
                 models: ModelPool, x: np.ndarray, y: np.ndarray, seed: int,
                 state_dir: Path, simulated_index: int | None = None,
                 dataset: Dataset | None = None) -> None:
        self.job = job
        self.node_id = node_id
        self.device = TrainingDevice(device)
        self.models = models
        self.x, self.y = x, y
        self.schema = wire.schema_of(weights_of(models.sample()))
        self.seed = seed
        self.state_dir = state_dir
        self.rng = random.Random(seed)
        self.rounds_trained = 0
        self.privacy: LocalPrivacy | None = None
        # Attack drills only: a simulated client's index, and the whole dataset, from which
        # colluding attackers rebuild each other's partitions.
        self.simulated_index = simulated_index
        self.dataset = dataset
        self.compressor = UpdateCompressor(
            ResidualStore(state_dir / "compression" / node_id), job.job_name)

    @property
    def model(self) -> torch.nn.Module:
        """The job's model (one of the pool's): for its structure and weights only."""
        return self.models.sample()

    @property
    def num_samples(self) -> int:
        return len(self.y)

    @classmethod
    def create(cls, *, job: JobIdentity, node_id: str, device: torch.device,
               simulated_index: int | None, data_path: str | None, state_dir: Path
               ) -> LocalTrainer:
        dataset = load_dataset(job.data, seed=job.seed, path=data_path)
        if simulated_index is not None:
            x, y = client_data(dataset, job.data, index=simulated_index,
                               num_clients=max(1, job.num_simulated_clients), seed=job.seed)
        else:
            x, y = dataset.x_train, dataset.y_train
        shape = tuple(job.input_shape) if job.input_shape else dataset.input_shape
        if tuple(x.shape[1:]) != shape:
            raise ValueError(f"local data has examples of shape {tuple(x.shape[1:])}, "
                             f"the job's model takes {shape}")
        models = model_pool(job.model, input_shape=shape,
                            num_classes=job.num_classes or dataset.num_classes, seed=job.seed)
        seed = job.seed * 1_000_003 + (simulated_index if simulated_index is not None
                                       else zlib.crc32(node_id.encode()) % 1_000_003)
        # The first optimizer of a process imports torch._dynamo under the import lock;
        # pay that now rather than inside round 1, where agents sharing a process queue on it.
        make_optimizer("sgd", models.sample().parameters(), 0.1)
        return cls(job=job, node_id=node_id, device=device, models=models, x=x, y=y, seed=seed,
                   state_dir=state_dir, simulated_index=simulated_index,
                   dataset=dataset if simulated_index is not None else None)

    def _privacy_for(self, plan: TrainPlan) -> LocalPrivacy | None:
        if plan.privacy.mode != "local":
            return None
        if self.privacy is None:
            from ..privacy import BudgetStore
            from ..privacy.dpsgd import require_dp_compatible

            require_dp_compatible(self.model, name=self.job.model)
            self.privacy = LocalPrivacy.open(
                plan.privacy, samples=self.num_samples, batch_size=plan.batch_size,
                local_epochs=plan.local_epochs, job=self.job.job_name,
                store=BudgetStore(self.state_dir / "privacy" / self.node_id))
        else:
            self.privacy.follow(plan.privacy)
        return self.privacy

    def epsilon_spent(self) -> float:
        return self.privacy.epsilon() if self.privacy else 0.0

    def drops_out(self, plan: TrainPlan) -> bool:
        """The fault drill of spec.simulation.dropout: skip this round silently."""
        return plan.dropout > 0 and self.rng.random() < plan.dropout

    def attack_of(self, plan: TrainPlan) -> AttackPlan | None:
        """The attack drill this client runs in `plan`'s round, if it is an attacker."""
        attack = plan.attack
        if attack is None or self.simulated_index is None:
            return None
        return attack if self.simulated_index in attack.attackers else None

    def refusal(self, plan: TrainPlan) -> Refusal | None:
        privacy = self._privacy_for(plan)
        if privacy is not None and not privacy.budget.fits_next_round():
            spent = privacy.epsilon()
            return Refusal(
                reason=f"another round of {privacy.budget.mechanism.steps} DP-SGD steps would "
                f"exceed targetEpsilon {privacy.budget.target_epsilon} (spent {spent:.4f})",
                epsilon=spent, delta=privacy.budget.delta)
        return None

    def train(self, plan: TrainPlan, global_weights: Weights) -> TrainOutcome:
        # On the CPU if the accelerator fails its first task. A DP attempt that failed
        # part-way has recorded its steps: the retry spends them again (over-counts, safe).
        return self.device.run(lambda device: self._train_on(device, plan, global_weights))

    def _train_on(self, device: torch.device, plan: TrainPlan,
                  global_weights: Weights) -> TrainOutcome:
        attack = self.attack_of(plan)
        y = self.y
        if attack is not None and attack.kind == "labelflip":
            share = attacks.strength_of(attack.kind, attack.strength, clients=1, attackers=0)
            y = attacks.flip_labels(self.y, self.job.num_classes or int(self.y.max()) + 1, share,
                                    np.random.default_rng(self.seed))
        torch.manual_seed(self.seed + plan.round)
        loader = make_loader(self.x, y, batch_size=plan.batch_size,
                             seed=self.seed + plan.round)
        privacy = self._privacy_for(plan)
        proximal = global_weights if plan.proximal_mu else None
        if privacy is None:
            with self.models.borrowed() as model:
                load_weights(model, global_weights)
                optimizer = make_optimizer(plan.optimizer, model.parameters(),  # type: ignore[arg-type]
                                           plan.learning_rate)
                result = train_local(model, loader, optimizer, epochs=plan.local_epochs,
                                     device=device, proximal_mu=plan.proximal_mu,
                                     global_weights=proximal,
                                     max_steps=plan.max_local_steps or None)
                trained = weights_of(model)
        else:
            from ..privacy.dpsgd import private_training, unwrap

            # Opacus wraps the module with hooks: train a fresh copy each round.
            model = copy.deepcopy(self.model)
            load_weights(model, global_weights)
            optimizer = make_optimizer(plan.optimizer, model.parameters(),  # type: ignore[arg-type]
                                       plan.learning_rate)
            # seed=None: private_training draws a secret seed, so no one who knows the
            # job's seed (the coordinator) can regenerate the noise or the sample.
            private_model, private_optimizer, private_loader = private_training(
                model, optimizer, loader,
                noise_multiplier=privacy.budget.mechanism.noise_multiplier,
                max_grad_norm=privacy.max_grad_norm, seed=None,
                accountant=privacy.budget.accountant, device=device)
            result = train_local(private_model, private_loader, private_optimizer,
                                 epochs=plan.local_epochs, device=device,
                                 proximal_mu=plan.proximal_mu, global_weights=proximal,
                                 max_steps=plan.max_local_steps or None)
            trained = weights_of(unwrap(private_model))
            # The accountant already holds every step taken; persist before uploading.
            privacy.save()
        self.rounds_trained += 1
        delta = {name: trained[name] - global_weights[name] for name in global_weights}
        if attack is not None:
            delta = self._poison(attack, plan, delta, global_weights, device)
        metrics = {"loss": float(result.loss), "accuracy": float(result.accuracy),
                   "steps": float(result.steps)}
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        return TrainOutcome(delta_weights=delta, num_samples=self.num_samples, metrics=metrics,
                            epsilon=self.epsilon_spent(),
                            delta=privacy.budget.delta if privacy else 0.0)

    # ------------------------------------------------------------ attack drills

    def _poison(self, attack: AttackPlan, plan: TrainPlan, honest: Weights,
                global_weights: Weights, device: torch.device) -> Weights:
        clients = max(1, self.job.num_simulated_clients)
        strength = attacks.strength_of(attack.kind, attack.strength, clients=clients,
                                       attackers=len(attack.attackers))
        colluders: list[Weights] = []
        if attack.kind in attacks.COLLUDING:
            colluders = [honest if index == self.simulated_index else
                         self._honest_delta_of(index, plan, global_weights, device)
                         for index in attack.attackers]
        generator = torch.Generator().manual_seed(self.seed * 31 + plan.round)
        log.debug("round %d: attack drill %s (strength %.3g)", plan.round, attack.kind, strength)
        return attacks.poisoned(attack.kind, strength, own=honest, colluders=colluders,
                                generator=generator)

    def _honest_delta_of(self, index: int, plan: TrainPlan, global_weights: Weights,
                         device: torch.device) -> Weights:
        """The honest delta colluder `index` trains this round (its partition and seed),
        recomputed here as colluding simulated attackers share theirs."""
        assert self.dataset is not None
        x, y = client_data(self.dataset, self.job.data, index=index,
                           num_clients=max(1, self.job.num_simulated_clients), seed=self.job.seed)
        seed = self.job.seed * 1_000_003 + index
        torch.manual_seed(seed + plan.round)
        loader = make_loader(x, y, batch_size=plan.batch_size, seed=seed + plan.round)
        with self.models.borrowed() as model:
            load_weights(model, global_weights)
            optimizer = make_optimizer(plan.optimizer, model.parameters(),  # type: ignore[arg-type]
                                       plan.learning_rate)
            train_local(model, loader, optimizer, epochs=plan.local_epochs, device=device,
                        proximal_mu=plan.proximal_mu,
                        global_weights=global_weights if plan.proximal_mu else None)
            trained = weights_of(model)
        return {name: trained[name] - global_weights[name] for name in global_weights}
