"""TrainPlan is built from spec + round alone, and every protocol message survives the
trip through wire.convert unchanged."""

from __future__ import annotations

import pytest
from fedkube.runtime.messages import (
    Admission,
    Heartbeat,
    JobIdentity,
    NodeFacts,
    Payload,
    Registration,
    Rejected,
    RejectReason,
    Task,
    UpdateHeader,
)
from fedkube.runtime.plan import plan_for
from fedkube.runtime.proto import fedkube_pb2 as pb
from fedkube.runtime.spec import FederatedJobSpec
from fedkube.runtime.wire import convert


def _spec(**changes: object) -> FederatedJobSpec:
    return FederatedJobSpec.model_validate({
        "model": "mlp", "rounds": 7, "localEpochs": 2, "batchSize": 16, "learningRate": 0.3,
        "optimizer": "adam", "roundTimeoutSeconds": 30,
        "privacy": {"mode": "local", "targetEpsilon": 2.0, "delta": 1e-4},
        "simulation": {"clients": 4, "dropout": 0.25}, **changes})


def test_the_plan_carries_every_hyper_parameter_of_the_spec() -> None:
    plan = plan_for(_spec(), round=3, model_version=2, now=1000.0,
                    client_parameters={"proximal_mu": 0.1})
    assert (plan.round, plan.model_version, plan.local_epochs, plan.batch_size) == (3, 2, 2, 16)
    assert (plan.learning_rate, plan.optimizer, plan.dropout) == (0.3, "adam", 0.25)
    assert plan.deadline_unix == 1030.0
    assert plan.proximal_mu == 0.1
    assert plan.privacy.mode == "local" and plan.privacy.target_epsilon == 2.0
    assert plan.privacy.planned_rounds == 7  # calibration follows the spec's rounds


def test_an_edit_of_rounds_reaches_the_next_plan() -> None:
    before = plan_for(_spec(), round=1, model_version=0, now=0.0, client_parameters={})
    after = plan_for(_spec(rounds=12), round=2, model_version=1, now=0.0, client_parameters={})
    assert (before.privacy.planned_rounds, after.privacy.planned_rounds) == (7, 12)


def test_tasks_registrations_and_headers_round_trip_through_protobuf() -> None:
    plan = plan_for(_spec(), round=3, model_version=2, now=5.0,
                    client_parameters={"proximal_mu": 0.5})
    for task in (Task.train(plan), Task.stop("done")):
        message = convert.task_to_pb(task)
        again = convert.task_from_pb(pb.Task.FromString(message.SerializeToString()))
        assert again == task
    registration = Registration(node_id="n1", join_token="t", simulated_index=2,
                                facts=NodeFacts(device="mps", cpus=8, labels={"a": "b"},
                                                num_samples=40))
    assert convert.registration_from_pb(convert.registration_to_pb(registration)) == registration
    plain = Registration(node_id="", join_token="", facts=NodeFacts())
    assert convert.registration_from_pb(convert.registration_to_pb(plain)).simulated_index is None
    spec = _spec()
    admission = Admission(node_id="n1", heartbeat_interval_seconds=2.0, job=JobIdentity(
        job_name="j", model="mlp", data=spec.data, seed=3, num_simulated_clients=4,
        input_shape=(1, 8, 8), num_classes=10))
    assert convert.admission_from_pb(convert.admission_to_pb(admission)) == admission
    header = UpdateHeader(node_id="n1", round=3, model_version=2, payload=Payload.DELTA,
                          num_samples=9, metrics={"loss": 0.5}, epsilon_spent=0.2, delta=1e-5)
    assert convert.header_from_pb(convert.header_to_pb(header)) == header
    heartbeat = Heartbeat(node_id="n1", state="training", epsilon_spent=0.1)
    assert convert.heartbeat_from_pb(convert.heartbeat_to_pb(heartbeat)) == heartbeat


def test_an_unknown_payload_is_refused_as_malformed() -> None:
    with pytest.raises(Rejected) as refused:
        convert.header_from_pb(pb.UpdateHeader(node_id="n1", payload="weights"))
    assert refused.value.reason is RejectReason.MALFORMED
    assert "payload" in str(refused.value)


def test_every_reason_has_a_distinct_label_and_a_real_grpc_code() -> None:
    grpc = pytest.importorskip("grpc")
    labels = [reason.label for reason in RejectReason]
    assert len(labels) == len(set(labels))
    for reason in RejectReason:
        assert grpc.StatusCode[reason.code] is not grpc.StatusCode.OK
