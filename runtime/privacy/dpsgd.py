"""Local differential privacy on a client: DP-SGD (Abadi et al. 2016, "Deep Learning with
Differential Privacy") through Opacus, with the steps it runs recorded in fedkube's own
persistent :class:`PrivacyAccountant`.

How the agent uses this, per job and client:

1. once per job: ``steps_per_round, sample_rate = local_steps(n, batch_size, local_epochs)``
   and ``noise = calibrate_noise(target_epsilon=..., delta=..., sample_rate=sample_rate,
   steps=rounds_it_may_join * steps_per_round, accountant=...)`` (analysis.py), saved with
   the accountant in the :class:`~fedkube.runtime.privacy.store.BudgetStore`; calibrating
   per round instead would spend the whole budget every round;
2. each round: refuse if ``accountant.would_exceed(noise_multiplier=noise,
   sample_rate=sample_rate, steps=steps_per_round, ...)``; otherwise train with the triple
   from :func:`private_training`, which records every optimizer step it really takes into
   the accountant; save the accountant before the update leaves the device; send
   ``unwrap(model).state_dict()``.
"""

from __future__ import annotations

import secrets

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from .accountant import PrivacyAccountant
from .analysis import local_steps

__all__ = ["local_steps", "prepare_model", "private_training", "require_dp_compatible", "unwrap"]


def prepare_model(model: nn.Module) -> nn.Module:
    """A model Opacus can compute per-sample gradients for.

    Valid models come back as they are (the same object). Others go through
    ``ModuleValidator.fix``, which returns a fixed copy (e.g. BatchNorm → GroupNorm) and
    leaves ``model`` untouched. A fixed model has a different architecture, so the
    coordinator must build its global model through this same function, or global and local
    weights will not match; the model zoo's models avoid BatchNorm and are already valid, so
    for them this is a no-op on both sides. Raises ``ValueError`` listing what Opacus still
    rejects after fixing.
    """
    if ModuleValidator.is_valid(model):
        return model
    fixed = ModuleValidator.fix(model)
    problems = ModuleValidator.validate(fixed, strict=False)
    if problems:
        listed = "; ".join(str(problem) for problem in problems)
        raise ValueError(f"model cannot be made compatible with DP-SGD: {listed}")
    return fixed


def require_dp_compatible(model: nn.Module, *, name: str) -> None:
    """Refuse, before any training, a model Opacus cannot train with DP-SGD.

    Fixing it here (as :func:`prepare_model` does) would change the architecture on this
    device only: BatchNorm's running statistics would be missing from the weights the
    coordinator sends, and every round would fail. So the model is refused with what to
    change instead; ``name`` is the spec's ``model`` value the message names.
    """
    problems = ModuleValidator.validate(model, strict=False)
    if not problems:
        return
    listed = "; ".join(str(problem) for problem in problems)
    raise ValueError(
        f"model {name!r} cannot be trained with privacy.mode 'local' (DP-SGD): {listed}. "
        "BatchNorm mixes the examples of a batch, so per-example gradients and their "
        "privacy guarantee do not exist for it: build the model with GroupNorm or "
        "LayerNorm, or return fedkube.runtime.privacy.prepare_model(model) from the "
        "model factory so the coordinator and every agent build the same fixed model"
    )


def private_training(
    model: nn.Module,
    optimizer: Optimizer,
    loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    seed: int | None,
    accountant: PrivacyAccountant,
    poisson_sampling: bool = True,
    device: torch.device | None = None,
) -> tuple[nn.Module, DPOptimizer, DataLoader]:
    """``model``, ``optimizer`` and ``loader`` made private by Opacus' ``PrivacyEngine``:
    a ``GradSampleModule`` (per-sample gradients), a ``DPOptimizer`` (per-sample clipping to
    ``max_grad_norm``, Gaussian noise of ``noise_multiplier * max_grad_norm``) and, with
    ``poisson_sampling``, a loader that draws each example independently with the sample
    rate of :func:`local_steps`. Train with the returned triple as usual.

    ``noise_multiplier`` is the one calibrated for the job's whole planned participation
    (``analysis.calibrate_noise``), never re-derived per round. Every optimizer step that
    is taken is recorded into ``accountant`` (a step hook, as Opacus' own accountants
    attach), so it holds what really ran, even when a round stops early.

    ``model`` is the live module: its parameters are trained in place and Opacus' hooks sit
    on it until :func:`unwrap` removes them. ``seed`` fixes Poisson sampling and noise for
    reproducible simulations; None (what real devices pass) draws a secret seed from the
    OS. A seed known to the server (for example one sent in the task, or derived from the
    job's seed) would let it regenerate and subtract the noise, voiding local DP — and
    Opacus without generators of its own would draw from torch's global generator and the
    loader's, which callers typically seed from the job. Without Poisson sampling Opacus keeps the loader as given and the accounting
    is only an approximation (as Opacus documents).

    ``device`` is where training will run (default: where ``model``'s parameters are):
    the model is moved there first, because Opacus draws the noise where each parameter
    is, with a generator that has to live on that same device.
    """
    if not noise_multiplier > 0.0:
        raise ValueError(f"noise_multiplier must be > 0 for DP-SGD, got {noise_multiplier}")
    if not max_grad_norm > 0.0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    if seed is None:
        seed = secrets.randbits(62)
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    # Opacus draws noise on each parameter's device, so its generator lives there;
    # Poisson sampling draws on the CPU.
    noise_generator = torch.Generator(device=device).manual_seed(seed)
    sampling_generator = torch.Generator().manual_seed(seed + 1)
    engine = PrivacyEngine(accountant=accountant.mechanism, secure_mode=False)
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=poisson_sampling,
        noise_generator=noise_generator,
    )
    if poisson_sampling and sampling_generator is not None:
        # The Poisson loader is Opacus' new object, not the caller's; without secure mode
        # Opacus would sample with the global RNG or the caller loader's generator.
        private_loader.batch_sampler.generator = sampling_generator
    # The rate Opacus' own accountant hook would record (1 / len(loader)), equal to
    # local_steps()'s, so plan and record merge into one history entry.
    sample_rate = 1 / len(private_loader)

    def record_step(dp_optimizer: DPOptimizer) -> None:
        accountant.record(
            noise_multiplier=dp_optimizer.noise_multiplier,
            sample_rate=sample_rate * dp_optimizer.accumulated_iterations,
        )

    # Replaces the engine's hook: fedkube's accountant, persisted per job, is the record;
    # the engine's would be thrown away with the engine at the end of the round.
    private_optimizer.attach_step_hook(record_step)
    return private_model, private_optimizer, private_loader


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a ``GradSampleModule`` (Opacus' hooks and per-sample
    gradient attributes removed), whose ``state_dict`` keys are the original model's rather
    than prefixed with ``_module.``; any other module is returned as it is."""
    if isinstance(model, GradSampleModule):
        return model.to_standard_module()
    return model
