from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeviceFacts(_message.Message):
    __slots__ = ("device", "platform", "machine", "cpus", "memory_bytes", "accelerator", "labels", "num_samples", "hostname")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    MACHINE_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    device: str
    platform: str
    machine: str
    cpus: int
    memory_bytes: int
    accelerator: str
    labels: _containers.ScalarMap[str, str]
    num_samples: int
    hostname: str
    def __init__(self, device: _Optional[str] = ..., platform: _Optional[str] = ..., machine: _Optional[str] = ..., cpus: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., accelerator: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., num_samples: _Optional[int] = ..., hostname: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("join_token", "node_id", "facts", "simulated_index", "simulated", "session")
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_INDEX_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    join_token: str
    node_id: str
    facts: DeviceFacts
    simulated_index: int
    simulated: bool
    session: str
    def __init__(self, join_token: _Optional[str] = ..., node_id: _Optional[str] = ..., facts: _Optional[_Union[DeviceFacts, _Mapping]] = ..., simulated_index: _Optional[int] = ..., simulated: bool = ..., session: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("node_id", "heartbeat_interval_seconds", "job", "session")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    heartbeat_interval_seconds: float
    job: JobIdentity
    session: str
    def __init__(self, node_id: _Optional[str] = ..., heartbeat_interval_seconds: _Optional[float] = ..., job: _Optional[_Union[JobIdentity, _Mapping]] = ..., session: _Optional[str] = ...) -> None: ...

class JobIdentity(_message.Message):
    __slots__ = ("job_name", "model", "data_spec_json", "seed", "num_simulated_clients", "input_shape", "num_classes")
    JOB_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATA_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_SIMULATED_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    job_name: str
    model: str
    data_spec_json: str
    seed: int
    num_simulated_clients: int
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    def __init__(self, job_name: _Optional[str] = ..., model: _Optional[str] = ..., data_spec_json: _Optional[str] = ..., seed: _Optional[int] = ..., num_simulated_clients: _Optional[int] = ..., input_shape: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "state", "epsilon_spent")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    state: str
    epsilon_spent: float
    def __init__(self, node_id: _Optional[str] = ..., state: _Optional[str] = ..., epsilon_spent: _Optional[float] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("job_running", "round")
    JOB_RUNNING_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    job_running: bool
    round: int
    def __init__(self, job_running: bool = ..., round: _Optional[int] = ...) -> None: ...

class StreamTasksRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class PrivacyPlan(_message.Message):
    __slots__ = ("mode", "target_epsilon", "delta", "max_grad_norm", "noise_multiplier", "accountant", "planned_rounds")
    MODE_FIELD_NUMBER: _ClassVar[int]
    TARGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_FIELD_NUMBER: _ClassVar[int]
    PLANNED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    mode: str
    target_epsilon: float
    delta: float
    max_grad_norm: float
    noise_multiplier: float
    accountant: str
    planned_rounds: int
    def __init__(self, mode: _Optional[str] = ..., target_epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., max_grad_norm: _Optional[float] = ..., noise_multiplier: _Optional[float] = ..., accountant: _Optional[str] = ..., planned_rounds: _Optional[int] = ...) -> None: ...

class TrainPlan(_message.Message):
    __slots__ = ("round", "model_version", "local_epochs", "batch_size", "learning_rate", "optimizer", "privacy", "deadline_unix", "client_parameters", "dropout", "secure_aggregation", "compression", "slow_fraction", "slowdown", "availability_period_seconds", "availability_online_fraction", "max_local_steps", "attack")
    class ClientParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    SLOW_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SLOWDOWN_FIELD_NUMBER: _ClassVar[int]
    AVAILABILITY_PERIOD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AVAILABILITY_ONLINE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MAX_LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ATTACK_FIELD_NUMBER: _ClassVar[int]
    round: int
    model_version: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    privacy: PrivacyPlan
    deadline_unix: float
    client_parameters: _containers.ScalarMap[str, float]
    dropout: float
    secure_aggregation: SecAggPlan
    compression: CompressionPlan
    slow_fraction: float
    slowdown: float
    availability_period_seconds: float
    availability_online_fraction: float
    max_local_steps: int
    attack: AttackDrill
    def __init__(self, round: _Optional[int] = ..., model_version: _Optional[int] = ..., local_epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., optimizer: _Optional[str] = ..., privacy: _Optional[_Union[PrivacyPlan, _Mapping]] = ..., deadline_unix: _Optional[float] = ..., client_parameters: _Optional[_Mapping[str, float]] = ..., dropout: _Optional[float] = ..., secure_aggregation: _Optional[_Union[SecAggPlan, _Mapping]] = ..., compression: _Optional[_Union[CompressionPlan, _Mapping]] = ..., slow_fraction: _Optional[float] = ..., slowdown: _Optional[float] = ..., availability_period_seconds: _Optional[float] = ..., availability_online_fraction: _Optional[float] = ..., max_local_steps: _Optional[int] = ..., attack: _Optional[_Union[AttackDrill, _Mapping]] = ...) -> None: ...

class CompressionPlan(_message.Message):
    __slots__ = ("top_k", "quantize_bits", "error_feedback", "lossless", "target_upload_seconds", "downlink")
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_BITS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    LOSSLESS_FIELD_NUMBER: _ClassVar[int]
    TARGET_UPLOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_FIELD_NUMBER: _ClassVar[int]
    top_k: float
    quantize_bits: int
    error_feedback: bool
    lossless: str
    target_upload_seconds: float
    downlink: str
    def __init__(self, top_k: _Optional[float] = ..., quantize_bits: _Optional[int] = ..., error_feedback: bool = ..., lossless: _Optional[str] = ..., target_upload_seconds: _Optional[float] = ..., downlink: _Optional[str] = ...) -> None: ...

class SecAggPlan(_message.Message):
    __slots__ = ("enabled", "clip_norm", "noise_std")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    NOISE_STD_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    clip_norm: float
    noise_std: float
    def __init__(self, enabled: bool = ..., clip_norm: _Optional[float] = ..., noise_std: _Optional[float] = ...) -> None: ...

class AttackDrill(_message.Message):
    __slots__ = ("kind", "strength", "attackers")
    KIND_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    ATTACKERS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    strength: float
    attackers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, kind: _Optional[str] = ..., strength: _Optional[float] = ..., attackers: _Optional[_Iterable[int]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("kind", "plan", "reason")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TRAIN: _ClassVar[Task.Kind]
        STOP: _ClassVar[Task.Kind]
    TRAIN: Task.Kind
    STOP: Task.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    kind: Task.Kind
    plan: TrainPlan
    reason: str
    def __init__(self, kind: _Optional[_Union[Task.Kind, str]] = ..., plan: _Optional[_Union[TrainPlan, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("node_id", "model_version", "held_version")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HELD_VERSION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    model_version: int
    held_version: int
    def __init__(self, node_id: _Optional[str] = ..., model_version: _Optional[int] = ..., held_version: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("name", "shape", "dtype", "offset", "data", "model_version", "encoding", "delta")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    offset: int
    data: bytes
    model_version: int
    encoding: TensorEncoding
    delta: ModelDelta
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., model_version: _Optional[int] = ..., encoding: _Optional[_Union[TensorEncoding, _Mapping]] = ..., delta: _Optional[_Union[ModelDelta, _Mapping]] = ...) -> None: ...

class ModelDelta(_message.Message):
    __slots__ = ("base_version", "lossless", "size", "checksum")
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOSSLESS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    base_version: int
    lossless: str
    size: int
    checksum: int
    def __init__(self, base_version: _Optional[int] = ..., lossless: _Optional[str] = ..., size: _Optional[int] = ..., checksum: _Optional[int] = ...) -> None: ...

class TensorEncoding(_message.Message):
    __slots__ = ("count", "sparse", "bits", "block", "lossless", "size")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    LOSSLESS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    count: int
    sparse: bool
    bits: int
    block: int
    lossless: str
    size: int
    def __init__(self, count: _Optional[int] = ..., sparse: bool = ..., bits: _Optional[int] = ..., block: _Optional[int] = ..., lossless: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("node_id", "round", "model_version", "num_samples", "metrics", "epsilon_spent", "delta", "payload", "refusal_reason", "compression", "uplink_bytes_per_second", "upload_bytes")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_REASON_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    UPLINK_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    round: int
    model_version: int
    num_samples: int
    metrics: _containers.ScalarMap[str, float]
    epsilon_spent: float
    delta: float
    payload: str
    refusal_reason: str
    compression: str
    uplink_bytes_per_second: float
    upload_bytes: int
    def __init__(self, node_id: _Optional[str] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ..., num_samples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., epsilon_spent: _Optional[float] = ..., delta: _Optional[float] = ..., payload: _Optional[str] = ..., refusal_reason: _Optional[str] = ..., compression: _Optional[str] = ..., uplink_bytes_per_second: _Optional[float] = ..., upload_bytes: _Optional[int] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "tensor")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    tensor: TensorChunk
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., tensor: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("accepted", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    def __init__(self, accepted: bool = ..., message: _Optional[str] = ...) -> None: ...

class SecAggAdvert(_message.Message):
    __slots__ = ("node_id", "round", "cipher_public", "mask_public")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    round: int
    cipher_public: bytes
    mask_public: bytes
    def __init__(self, node_id: _Optional[str] = ..., round: _Optional[int] = ..., cipher_public: _Optional[bytes] = ..., mask_public: _Optional[bytes] = ...) -> None: ...

class SecAggPeer(_message.Message):
    __slots__ = ("node_id", "cipher_public", "mask_public")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    cipher_public: bytes
    mask_public: bytes
    def __init__(self, node_id: _Optional[str] = ..., cipher_public: _Optional[bytes] = ..., mask_public: _Optional[bytes] = ...) -> None: ...

class SecAggRoster(_message.Message):
    __slots__ = ("round", "clients", "threshold", "value_range", "neighbours")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    VALUE_RANGE_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    round: int
    clients: int
    threshold: int
    value_range: float
    neighbours: _containers.RepeatedCompositeFieldContainer[SecAggPeer]
    def __init__(self, round: _Optional[int] = ..., clients: _Optional[int] = ..., threshold: _Optional[int] = ..., value_range: _Optional[float] = ..., neighbours: _Optional[_Iterable[_Union[SecAggPeer, _Mapping]]] = ...) -> None: ...

class SecAggShare(_message.Message):
    __slots__ = ("sender", "recipient", "nonce", "ciphertext")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    sender: str
    recipient: str
    nonce: bytes
    ciphertext: bytes
    def __init__(self, sender: _Optional[str] = ..., recipient: _Optional[str] = ..., nonce: _Optional[bytes] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class SecAggShareBundle(_message.Message):
    __slots__ = ("node_id", "round", "seed_commitment", "shares")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SEED_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    round: int
    seed_commitment: bytes
    shares: _containers.RepeatedCompositeFieldContainer[SecAggShare]
    def __init__(self, node_id: _Optional[str] = ..., round: _Optional[int] = ..., seed_commitment: _Optional[bytes] = ..., shares: _Optional[_Iterable[_Union[SecAggShare, _Mapping]]] = ...) -> None: ...

class SecAggDelivery(_message.Message):
    __slots__ = ("round", "shares")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    round: int
    shares: _containers.RepeatedCompositeFieldContainer[SecAggShare]
    def __init__(self, round: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[SecAggShare, _Mapping]]] = ...) -> None: ...

class SecAggUnmaskRequest(_message.Message):
    __slots__ = ("round", "dropped", "survivors")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    round: int
    dropped: _containers.RepeatedScalarFieldContainer[str]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, round: _Optional[int] = ..., dropped: _Optional[_Iterable[str]] = ..., survivors: _Optional[_Iterable[str]] = ...) -> None: ...

class SecAggRevealed(_message.Message):
    __slots__ = ("owner", "index", "share")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    owner: str
    index: int
    share: bytes
    def __init__(self, owner: _Optional[str] = ..., index: _Optional[int] = ..., share: _Optional[bytes] = ...) -> None: ...

class SecAggUnmaskResponse(_message.Message):
    __slots__ = ("node_id", "round", "key_shares", "seed_shares")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    SEED_SHARES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    round: int
    key_shares: _containers.RepeatedCompositeFieldContainer[SecAggRevealed]
    seed_shares: _containers.RepeatedCompositeFieldContainer[SecAggRevealed]
    def __init__(self, node_id: _Optional[str] = ..., round: _Optional[int] = ..., key_shares: _Optional[_Iterable[_Union[SecAggRevealed, _Mapping]]] = ..., seed_shares: _Optional[_Iterable[_Union[SecAggRevealed, _Mapping]]] = ...) -> None: ...
