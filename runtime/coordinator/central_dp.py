"""Central (user-level) DP-FedAvg at the coordinator (McMahan et al. 2018, "Learning
Differentially Private Recurrent Language Models"): each update clipped to maxGradNorm
(the transform stage of the update path), an equal-weight mean, Gaussian noise of std
z*S/m on the mean, and the budget accounted per round at the sampling rate really used."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..privacy.analysis import central_noise_std
from ..privacy.budget import Budget
from ..privacy.central import add_gaussian_noise, clip_update
from ..spec import FederatedJobSpec

Weights = dict[str, torch.Tensor]


@dataclass
class CentralDP:
    clip_norm: float
    budget: Budget

    @classmethod
    def for_job(cls, spec: FederatedJobSpec) -> CentralDP:
        privacy = spec.privacy
        population = spec.simulation.clients or spec.clients_per_round or spec.min_clients
        return cls(clip_norm=privacy.max_grad_norm, budget=Budget.central(
            clients_per_round=spec.clients_to_select(population), population=population,
            planned_rounds=spec.rounds, target_epsilon=privacy.target_epsilon,
            delta=privacy.delta, accountant=privacy.accountant,
            noise_multiplier=privacy.noise_multiplier))

    @property
    def noise_multiplier(self) -> float:
        return self.budget.mechanism.noise_multiplier

    def transform(self, delta: Weights) -> Weights:
        return clip_update(delta, max_norm=self.clip_norm)

    def noise_std(self, averaged: int) -> float:
        """Std of the noise on an equal-weight mean of `averaged` clipped updates: the
        mean's sensitivity is S / averaged, so fewer arrivals need more noise."""
        return central_noise_std(noise_multiplier=self.noise_multiplier,
                                 clip_norm=self.clip_norm, clients_per_round=averaged)

    def noised(self, mean_delta: Weights, *, averaged: int,
               generator: torch.Generator) -> Weights:
        return add_gaussian_noise(mean_delta, std=self.noise_std(averaged), generator=generator)
