"""One client's local work for a round: load the global model, train on local data
(optionally with DP-SGD), and return the delta. No network here."""

from __future__ import annotations

import copy
import logging
import math
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import wire
from ..data import client_data, load_dataset
from ..models import build_model
from ..proto import fedkube_pb2 as pb
from ..spec import FederatedJobSpec
from ..training import load_weights, make_loader, make_optimizer, train_local, weights_of
from .device import TrainingDevice

if TYPE_CHECKING:
    from ..privacy import BudgetStore, PrivacyAccountant

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


@dataclass
class LocalPrivacy:
    """This device's DP-SGD state for one job: calibrated once for the whole planned
    participation, accounted cumulatively, persisted across agent restarts."""

    store: BudgetStore
    job: str
    accountant: PrivacyAccountant
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    target_epsilon: float | None
    delta: float
    max_grad_norm: float

    def epsilon(self) -> float:
        return self.accountant.epsilon(self.delta) if self.accountant.history else 0.0

    def would_exceed(self) -> bool:
        if self.target_epsilon is None:
            return False
        return self.accountant.would_exceed(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
            steps=self.steps_per_round, target_epsilon=self.target_epsilon, delta=self.delta)

    def save(self) -> None:
        self.store.save(self.job, self.accountant, extra={
            "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
            "steps_per_round": self.steps_per_round})


class LocalTrainer:
    def __init__(self, *, spec: FederatedJobSpec, job: str, node_id: str, device: torch.device,
                 model: torch.nn.Module, x: np.ndarray, y: np.ndarray,
                 privacy: LocalPrivacy | None, seed: int) -> None:
        self.spec = spec
        self.job = job
        self.node_id = node_id
        self.device = TrainingDevice(device)
        self.model = model
        self.x, self.y = x, y
        self.privacy = privacy
        self.schema = wire.schema_of(weights_of(model))
        self.seed = seed
        self.rng = random.Random(seed)
        self.rounds_trained = 0

    @property
    def num_samples(self) -> int:
        return len(self.y)

    @classmethod
    def create(cls, *, spec: FederatedJobSpec, job: str, node_id: str, device: torch.device,
               input_shape: tuple[int, ...], num_classes: int, simulated_index: int | None,
               num_simulated: int, data_path: str | None, state_dir: Path) -> LocalTrainer:
        dataset = load_dataset(spec.data, seed=spec.seed, path=data_path)
        if simulated_index is not None:
            x, y = client_data(dataset, spec.data, index=simulated_index,
                               num_clients=max(1, num_simulated), seed=spec.seed)
        else:
            x, y = dataset.x_train, dataset.y_train
        shape = tuple(input_shape) if input_shape else dataset.input_shape
        if tuple(x.shape[1:]) != shape:
            raise ValueError(f"local data has examples of shape {tuple(x.shape[1:])}, "
                             f"the job's model takes {shape}")
        model = build_model(spec.model, input_shape=shape,  # type: ignore[arg-type]
                            num_classes=num_classes or dataset.num_classes, seed=spec.seed)
        if spec.privacy.mode == "local":
            from ..privacy.dpsgd import require_dp_compatible

            require_dp_compatible(model, name=spec.model)
        seed = spec.seed * 1_000_003 + (simulated_index if simulated_index is not None
                                        else zlib.crc32(node_id.encode()) % 1_000_003)
        # The first optimizer of a process imports torch._dynamo under the import lock;
        # pay that now rather than inside round 1, where agents sharing a process queue on it.
        make_optimizer(spec.optimizer, model.parameters(), spec.learning_rate)
        privacy = None
        if spec.privacy.mode == "local":
            privacy = cls._local_privacy(spec, job=job, node_id=node_id, samples=len(y),
                                         state_dir=state_dir)
        return cls(spec=spec, job=job, node_id=node_id, device=device, model=model,
                   x=x, y=y, privacy=privacy, seed=seed)

    @staticmethod
    def _local_privacy(spec: FederatedJobSpec, *, job: str, node_id: str, samples: int,
                       state_dir: Path) -> LocalPrivacy:
        # Imported here: Opacus costs seconds of start-up that non-private jobs never need.
        from ..privacy import BudgetStore, PrivacyAccountant, calibrate_noise, local_steps

        settings = spec.privacy
        store = BudgetStore(state_dir / "privacy" / node_id)
        steps_per_round, sample_rate = local_steps(samples, spec.batch_size, spec.local_epochs)
        saved = store.read(job)
        if saved is not None:
            accountant = saved.accountant
            noise = float(saved.extra["noise_multiplier"])
            log.info("resuming privacy budget for %s: epsilon %.4f spent", job,
                     accountant.epsilon(settings.delta) if accountant.history else 0.0)
        else:
            accountant = PrivacyAccountant(mechanism=settings.accountant)
            # Calibrated once, for every round this client could be picked in.
            noise = settings.noise_multiplier or calibrate_noise(
                target_epsilon=settings.target_epsilon, delta=settings.delta,
                sample_rate=sample_rate, steps=spec.rounds * steps_per_round,
                accountant=settings.accountant)
            store.save(job, accountant, extra={
                "noise_multiplier": noise, "sample_rate": sample_rate,
                "steps_per_round": steps_per_round})
        if settings.delta >= 1.0 / max(1, samples):
            log.warning("privacy.delta %.2g is not below 1/dataset size (%d examples)",
                        settings.delta, samples)
        return LocalPrivacy(
            store=store, job=job, accountant=accountant, noise_multiplier=noise,
            sample_rate=sample_rate, steps_per_round=steps_per_round,
            target_epsilon=settings.target_epsilon, delta=settings.delta,
            max_grad_norm=settings.max_grad_norm)

    def epsilon_spent(self) -> float:
        return self.privacy.epsilon() if self.privacy else 0.0

    def drops_out(self) -> bool:
        """The fault drill of spec.simulation.dropout: skip this round silently."""
        return self.spec.simulation.dropout > 0 and self.rng.random() < self.spec.simulation.dropout

    def refusal(self, task: pb.Task) -> Refusal | None:
        if self.privacy is not None and self.privacy.would_exceed():
            spent = self.privacy.epsilon()
            return Refusal(
                reason=f"another round of {self.privacy.steps_per_round} DP-SGD steps would "
                f"exceed targetEpsilon {self.privacy.target_epsilon} (spent {spent:.4f})",
                epsilon=spent, delta=self.privacy.delta)
        return None

    def train(self, task: pb.Task, global_weights: Weights) -> TrainOutcome:
        # On the CPU if the accelerator fails its first task. A DP attempt that failed
        # part-way has recorded its steps: the retry spends them again (over-counts, safe).
        return self.device.run(lambda device: self._train_on(device, task, global_weights))

    def _train_on(self, device: torch.device, task: pb.Task,
                  global_weights: Weights) -> TrainOutcome:
        torch.manual_seed(self.seed + task.round)
        loader = make_loader(self.x, self.y, batch_size=task.batch_size,
                             seed=self.seed + task.round)
        if self.privacy is None:
            model = self.model
            load_weights(model, global_weights)
            optimizer = make_optimizer(task.optimizer or "sgd", model.parameters(),
                                       task.learning_rate)
            result = train_local(model, loader, optimizer, epochs=task.local_epochs,
                                 device=device, proximal_mu=task.proximal_mu,
                                 global_weights=global_weights if task.proximal_mu else None)
            trained = weights_of(model)
        else:
            from ..privacy.dpsgd import private_training, unwrap

            # Opacus wraps the module with hooks: train a fresh copy each round.
            model = copy.deepcopy(self.model)
            load_weights(model, global_weights)
            optimizer = make_optimizer(task.optimizer or "sgd", model.parameters(),
                                       task.learning_rate)
            # seed=None: private_training draws a secret seed, so no one who knows the
            # job's seed (the coordinator) can regenerate the noise or the sample.
            private_model, private_optimizer, private_loader = private_training(
                model, optimizer, loader, noise_multiplier=self.privacy.noise_multiplier,
                max_grad_norm=self.privacy.max_grad_norm, seed=None,
                accountant=self.privacy.accountant, device=device)
            result = train_local(private_model, private_loader, private_optimizer,
                                 epochs=task.local_epochs, device=device,
                                 proximal_mu=task.proximal_mu,
                                 global_weights=global_weights if task.proximal_mu else None)
            trained = weights_of(unwrap(private_model))
            # The accountant already holds every step taken; persist before uploading.
            self.privacy.save()
        self.rounds_trained += 1
        delta = {name: trained[name] - global_weights[name] for name in global_weights}
        metrics = {"loss": float(result.loss), "accuracy": float(result.accuracy),
                   "steps": float(result.steps)}
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        epsilon = self.epsilon_spent()
        return TrainOutcome(delta_weights=delta, num_samples=self.num_samples, metrics=metrics,
                            epsilon=epsilon, delta=self.privacy.delta if self.privacy else 0.0)
