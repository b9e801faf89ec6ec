"""Privacy arithmetic for the Poisson-subsampled Gaussian mechanism: epsilon of a schedule,
noise calibration, and how many steps a budget allows.

Pure functions over floats (numpy and Opacus' analysis maths only; no torch modules, no I/O).
Every DP mechanism fedkube runs is a Poisson-subsampled Gaussian mechanism composed over
steps, so one set of functions serves both modes:

- local DP (DP-SGD, Abadi et al. 2016, "Deep Learning with Differential Privacy"):
  ``sample_rate`` = a client's Poisson sampling rate, ``steps`` = optimizer steps it takes;
- central DP (DP-FedAvg, McMahan et al. 2018, "Learning Differentially Private Recurrent
  Language Models"): ``sample_rate`` = clients per round / total clients (see
  :func:`central_sample_rate`), ``steps`` = rounds. The noise is added to the mean of the
  clipped updates with the standard deviation of :func:`central_noise_std`.

Two accountants, as in Opacus:

- ``"rdp"``: Rényi DP of the sampled Gaussian mechanism (Mironov et al. 2019, "Rényi
  Differential Privacy of the Sampled Gaussian Mechanism", arXiv:1908.10530), converted to
  (epsilon, delta) by Balle et al. 2020, "Hypothesis Testing Interpretations and Rényi
  Differential Privacy", Theorem 21. Same orders as Opacus' ``RDPAccountant`` so the numbers
  agree with it.
- ``"prv"``: numerical composition of privacy loss random variables (Gopi et al. 2021,
  "Numerical Composition of Differential Privacy", arXiv:2106.02848) with Opacus' defaults
  (``eps_error`` 0.01, ``delta_error`` delta/1000); returns the certified upper bound, which
  is tighter than RDP but costs tens to hundreds of milliseconds per evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal, NamedTuple

import numpy as np

# Opacus is imported where it is used: importing it pulls in torch.distributed, SymPy and
# SciPy (seconds of CPU), which every agent process and `fedkube run` would otherwise pay
# at start-up whether or not the job uses differential privacy.

Mechanism = Literal["rdp", "prv"]
MECHANISMS: tuple[Mechanism, ...] = ("rdp", "prv")

#: RDP orders; identical to ``opacus.accountants.RDPAccountant.DEFAULT_ALPHAS`` (a test
#: holds us to that) so that our epsilon equals the one Opacus users are used to.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))

#: Opacus' defaults for the PRV accountant's error bounds.
PRV_EPS_ERROR = 0.01
PRV_DELTA_ERROR_FRACTION = 1e-3

#: Relative width of the final bisection bracket in :func:`calibrate_noise`.
CALIBRATION_REL_TOL = 1e-3
#: No calibration goes beyond this noise multiplier (Opacus gives up at the same point).
MAX_NOISE_MULTIPLIER = 1e6


class Step(NamedTuple):
    """``steps`` repetitions of one Poisson-subsampled Gaussian mechanism."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def _check_mechanism(accountant: str) -> None:
    if accountant not in MECHANISMS:
        raise ValueError(f"accountant must be one of {MECHANISMS}, got {accountant!r}")


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def validated_step(step: Step) -> Step:
    """``step`` itself, once its fields are checked (ValueError with the reason otherwise)."""
    if not (math.isfinite(step.noise_multiplier) and step.noise_multiplier >= 0.0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {step.noise_multiplier}")
    if not 0.0 <= step.sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in [0, 1], got {step.sample_rate}")
    if step.steps < 0:
        raise ValueError(f"steps must be >= 0, got {step.steps}")
    return step


@lru_cache(maxsize=1024)
def _rdp_of_one_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    # RDP is additive over steps, so one vector per mechanism serves every step count;
    # cached because calibration and budget searches revisit the same mechanism many times.
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = np.asarray(
        compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ORDERS),
        dtype=np.float64,
    )
    rdp.setflags(write=False)
    return rdp


def _rdp_to_epsilon(rdp: np.ndarray, delta: float) -> float:
    """Balle et al. 2020, Theorem 21 (the conversion Opacus' ``get_privacy_spent`` uses),
    without its warning about the optimal order sitting at the edge of the range: that
    warning fires constantly during calibration and says nothing actionable there."""
    orders = np.asarray(RDP_ORDERS)
    with np.errstate(invalid="ignore"):
        eps = rdp - (math.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    if np.isnan(eps).all():
        return math.inf
    # A negative bound still certifies (0, delta)-DP, and epsilon below 0 means nothing.
    return max(0.0, float(np.nanmin(eps)))


def _rdp_epsilon(steps: Sequence[Step], delta: float) -> float:
    rdp = np.zeros(len(RDP_ORDERS))
    for step in steps:
        rdp = rdp + step.steps * _rdp_of_one_step(step.sample_rate, step.noise_multiplier)
    return _rdp_to_epsilon(rdp, delta)


def rdp_epsilon_floor(delta: float) -> float:
    """The smallest epsilon the RDP accountant can certify at ``delta``, however much noise:
    the conversion's cost at zero Rényi divergence (about 0.10 at delta 1e-5)."""
    _check_delta(delta)
    return _rdp_to_epsilon(np.zeros(len(RDP_ORDERS)), delta)


def _prv_epsilon(steps: Sequence[Step], delta: float) -> float:
    """Gopi et al. 2021 as Opacus' ``PRVAccountant.get_epsilon`` runs it: discretise each
    mechanism's PRV on one safe domain, compose by FFT, read off the upper bound."""
    from opacus.accountants.analysis.prv import (
        Domain,
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        discretize,
    )

    eps_error = PRV_EPS_ERROR
    delta_error = delta * PRV_DELTA_ERROR_FRACTION
    counts = [step.steps for step in steps]
    total = sum(counts)
    # Safe truncation of the domain, remark 5.6 of Gopi et al. (the same bound Opacus'
    # compute_safe_domain_size takes), through our warning-free RDP conversion.
    half_width = _rdp_epsilon(steps, delta_error / 4)
    for step in steps:
        single = Step(step.noise_multiplier, step.sample_rate, 1)
        half_width = max(half_width, _rdp_epsilon([single], delta_error / (8 * total)))
    half_width = max(half_width, eps_error) + 3
    mesh = eps_error / math.sqrt(total * math.log(12 / delta_error) / 2)
    domain = Domain.create_aligned(-half_width, half_width, mesh)
    # sample_rate 1 makes log(1 - q) = -inf inside Opacus' PRV formulas; the resulting
    # masked-out branch is harmless, only the warning is noise.
    with np.errstate(divide="ignore"):
        prvs = [PoissonSubsampledGaussianPRV(step.sample_rate, step.noise_multiplier) for step in steps]
        dprvs = [
            discretize(TruncatedPrivacyRandomVariable(prv, domain.t_min, domain.t_max), domain)
            for prv in prvs
        ]
        composed = compose_heterogeneous(dprvs=dprvs, num_self_compositions=counts)
        _, _, eps_upper = composed.compute_epsilon(delta, delta_error, eps_error)
    return max(0.0, float(eps_upper))


@lru_cache(maxsize=4096)
def _compose_canonical(steps: tuple[Step, ...], delta: float, accountant: Mechanism) -> float:
    if not steps:
        return 0.0
    if any(step.noise_multiplier == 0.0 for step in steps):
        return math.inf
    if accountant == "rdp":
        return _rdp_epsilon(steps, delta)
    return _prv_epsilon(steps, delta)


def compose_epsilon(steps: Sequence[Step], *, delta: float, accountant: Mechanism) -> float:
    """Epsilon at ``delta`` of running every mechanism in ``steps`` (a heterogeneous
    schedule: different noise multipliers and sample rates compose).

    Composition does not depend on order, so equal mechanisms anywhere in the schedule are
    merged first (RDP: same sum; PRV: fewer convolutions, one discretisation each). Steps
    that sample nothing or run zero times cost nothing. A mechanism without noise that
    samples data costs ``inf``.
    """
    _check_mechanism(accountant)
    _check_delta(delta)
    merged: dict[tuple[float, float], int] = {}
    for raw in steps:
        step = Step(float(raw[0]), float(raw[1]), int(raw[2]))
        validated_step(step)
        if step.steps == 0 or step.sample_rate == 0.0:
            continue
        key = (step.noise_multiplier, step.sample_rate)
        merged[key] = merged.get(key, 0) + step.steps
    canonical = tuple(sorted(Step(z, q, n) for (z, q), n in merged.items()))
    return _compose_canonical(canonical, float(delta), accountant)


def epsilon_for(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: Mechanism,
) -> float:
    """Epsilon at ``delta`` after ``steps`` runs of the Poisson-subsampled Gaussian mechanism
    with this noise multiplier and sample rate (0.0 for 0 steps)."""
    return compose_epsilon(
        [Step(noise_multiplier, sample_rate, steps)], delta=delta, accountant=accountant
    )


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Mechanism,
    rel_tol: float = CALIBRATION_REL_TOL,
    spent: Sequence[Step] = (),
) -> float:
    """The smallest noise multiplier (to ``rel_tol``) whose ``steps`` runs at ``sample_rate``
    stay within ``target_epsilon`` at ``delta`` — after the mechanisms already ``spent``
    (a budget re-planned mid-job composes what it ran with what is still to come).

    Guarantee: for the returned ``z``, ``epsilon_for(z, ...) <= target_epsilon`` (checked, not
    assumed), and a noise multiplier of at least ``z * (1 - rel_tol)`` was seen to exceed the
    target, so any smaller one does too (epsilon falls as noise grows). Bisection, like
    Opacus' ``get_noise_multiplier``, but its bracket is relative (the precision is in the
    noise, not in epsilon) and it never returns a point it did not verify.

    0 steps or a sample rate of 0 release nothing: returns 0.0. Raises ``ValueError`` when
    no noise multiplier up to :data:`MAX_NOISE_MULTIPLIER` reaches the target (for RDP,
    targets at or below :func:`rdp_epsilon_floor` are refused at once).
    """
    _check_mechanism(accountant)
    _check_delta(delta)
    if not target_epsilon > 0.0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if not 0.0 < rel_tol < 1.0:
        raise ValueError(f"rel_tol must be in (0, 1), got {rel_tol}")
    validated_step(Step(1.0, sample_rate, steps))
    if steps == 0 or sample_rate == 0.0:
        return 0.0
    if accountant == "rdp" and target_epsilon <= rdp_epsilon_floor(delta):
        raise ValueError(
            f"target epsilon {target_epsilon} is below {rdp_epsilon_floor(delta):.4f}, the "
            f"smallest epsilon the RDP accountant certifies at delta {delta}; raise the target "
            f"or use the prv accountant"
        )

    def within(noise: float) -> bool:
        planned = [*spent, Step(noise, sample_rate, steps)]
        return compose_epsilon(planned, delta=delta, accountant=accountant) <= target_epsilon

    # PRV evaluations get slow (and memory-hungry) at small noise, where epsilon and hence
    # the discretisation domain are large; start from the RDP answer, which is close above
    # the PRV one, so the bracket search only probes moderate noise levels.
    start = 1.0
    if accountant == "prv" and target_epsilon > rdp_epsilon_floor(delta):
        start = calibrate_noise(
            target_epsilon=target_epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="rdp",
            rel_tol=rel_tol,
            spent=spent,
        )

    high = start
    low = 0.0  # noise 0 never meets a finite target
    while not within(high):
        low = high
        high *= 2.0
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} keeps {steps} steps at "
                f"sample rate {sample_rate} within epsilon {target_epsilon} (delta {delta}, "
                f"{accountant}); the budget is too small"
            )
    if low == 0.0:
        low = high / 2.0
        while within(low):
            high = low
            low /= 2.0
    while high - low > rel_tol * high:
        middle = (low + high) / 2.0
        if within(middle):
            high = middle
        else:
            low = middle
    return high


def steps_within_budget(
    *,
    noise_multiplier: float,
    sample_rate: float,
    target_epsilon: float,
    delta: float,
    accountant: Mechanism,
    max_steps: int,
) -> int:
    """The most steps (at most ``max_steps``) of this mechanism that keep epsilon at
    ``delta`` within ``target_epsilon``; 0 when not even one step fits. Binary search: epsilon
    grows with the number of steps."""
    if max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")

    def within(steps: int) -> bool:
        return (
            epsilon_for(
                noise_multiplier=noise_multiplier,
                sample_rate=sample_rate,
                steps=steps,
                delta=delta,
                accountant=accountant,
            )
            <= target_epsilon
        )

    if within(max_steps):
        return max_steps
    fits, exceeds = 0, max_steps
    while exceeds - fits > 1:
        middle = (fits + exceeds) // 2
        if within(middle):
            fits = middle
        else:
            exceeds = middle
    return fits


def central_sample_rate(*, clients_per_round: int, total_clients: int) -> float:
    """Sampling rate of users for DP-FedAvg accounting (McMahan et al. 2018): the chance a
    client is picked in a round. The analysis assumes each client joins independently with
    this probability (Poisson sampling); picking exactly ``clients_per_round`` at random is
    accounted with the same rate, the usual practice (TF Privacy, Flower)."""
    if total_clients < 1:
        raise ValueError(f"total_clients must be >= 1, got {total_clients}")
    if not 0 <= clients_per_round <= total_clients:
        raise ValueError(
            f"clients_per_round must be in [0, {total_clients}], got {clients_per_round}"
        )
    return clients_per_round / total_clients


def central_noise_std(*, noise_multiplier: float, clip_norm: float, clients_per_round: int) -> float:
    """Standard deviation of the Gaussian noise to add to the MEAN of ``clients_per_round``
    updates each clipped to L2 norm ``clip_norm``: ``z * S / m`` (McMahan et al. 2018,
    Algorithm 1 with the fixed-denominator estimator). The sum's sensitivity is ``S``; the
    mean divides sum and noise by ``m``, so ``m`` must be the number of updates actually
    averaged, with equal weights (weighting by sample counts changes the sensitivity)."""
    if not noise_multiplier >= 0.0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not clip_norm > 0.0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    if clients_per_round < 1:
        raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
    return noise_multiplier * clip_norm / clients_per_round


def local_steps(num_samples: int, batch_size: int, epochs: int) -> tuple[int, float]:
    """(optimizer steps per round, sample rate) of DP-SGD with Poisson sampling over
    ``num_samples`` examples, as Opacus runs it for a ``DataLoader(batch_size=batch_size)``.

    Opacus samples each example with probability ``1 / len(loader)`` =
    ``1 / ceil(num_samples / batch_size)`` (equal to ``batch_size / num_samples`` when the
    batch size divides the data, slightly smaller otherwise) and runs
    ``int(1 / sample_rate)`` steps an epoch; both are mirrored here exactly, so that the
    plan checked with ``would_exceed`` is the mechanism that runs and is recorded.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    batches = -(-num_samples // batch_size)
    sample_rate = 1 / batches
    # Not simply `batches`: Opacus' sampler truncates 1 / (1 / k), which is k - 1 for some k
    # (93, 99, ...); counting what will run keeps plan and record identical.
    return epochs * int(1 / sample_rate), sample_rate
