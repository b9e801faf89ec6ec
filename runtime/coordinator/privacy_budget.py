"""Central (user-level) DP-FedAvg at the coordinator (McMahan et al. 2018, "Learning
Differentially Private Recurrent Language Models"): each update clipped to maxGradNorm,
equal-weight mean, Gaussian noise of std z*S/m on the mean, epsilon accounted over rounds
with the client sampling rate q = m / N."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..privacy import PrivacyAccountant, calibrate_noise, central_noise_std
from ..privacy.central import add_gaussian_noise, clip_update
from ..spec import FederatedJobSpec

Weights = dict[str, torch.Tensor]


@dataclass
class CentralPrivacy:
    clip_norm: float
    noise_multiplier: float
    clients_per_round: int
    sample_rate: float
    target_epsilon: float | None
    delta: float
    accountant: PrivacyAccountant

    @classmethod
    def for_job(cls, spec: FederatedJobSpec) -> CentralPrivacy:
        privacy = spec.privacy
        population = spec.simulation.clients or spec.clients_per_round or spec.min_clients
        per_round = spec.clients_to_select(population)
        sample_rate = min(1.0, per_round / population)
        noise = privacy.noise_multiplier or calibrate_noise(
            target_epsilon=privacy.target_epsilon, delta=privacy.delta,
            sample_rate=sample_rate, steps=spec.rounds, accountant=privacy.accountant)
        return cls(
            clip_norm=privacy.max_grad_norm, noise_multiplier=noise,
            clients_per_round=per_round, sample_rate=sample_rate,
            target_epsilon=privacy.target_epsilon, delta=privacy.delta,
            accountant=PrivacyAccountant(mechanism=privacy.accountant))

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

    def record_round(self) -> None:
        self.accountant.record(noise_multiplier=self.noise_multiplier,
                               sample_rate=self.sample_rate, steps=1)

    def epsilon(self) -> float:
        return self.accountant.epsilon(self.delta)

    def next_round_would_exceed(self) -> bool:
        if self.target_epsilon is None or math.isinf(self.target_epsilon):
            return False
        return self.accountant.would_exceed(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=1,
            target_epsilon=self.target_epsilon, delta=self.delta)
