"""Prometheus metrics of the coordinator and the operator: values move with the calls,
stay apart between instances, and are served over HTTP on 127.0.0.1."""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Iterator

import kopf
import pytest
from fedkube.operator.metrics import OperatorMetrics, Outcome, serve_operator_metrics
from fedkube.runtime.coordinator.metrics import (
    MAX_CLIENT_SERIES,
    REASON_LABELS,
    CoordinatorMetrics,
)
from fedkube.runtime.messages import RejectReason
from fedkube.runtime.spec import ClientNodeStatus, ClientPhase, Phase
from prometheus_client.parser import text_string_to_metric_families


def samples(exposition: bytes | str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """{(sample name, labels): value} from Prometheus text format."""
    text = exposition.decode() if isinstance(exposition, bytes) else exposition
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(exposition: bytes | str, name: str, **labels: str) -> float:
    return samples(exposition)[(name, frozenset(labels.items()))]


def scrape(port: int) -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.headers["Content-Type"], response.read().decode()


@pytest.fixture
def coordinator() -> Iterator[CoordinatorMetrics]:
    metrics = CoordinatorMetrics()
    yield metrics
    metrics.close()


@pytest.fixture
def operator_metrics() -> Iterator[OperatorMetrics]:
    metrics = OperatorMetrics()
    yield metrics
    metrics.close()


# ------------------------------------------------------------------ coordinator


def test_coordinator_counters_and_gauges_follow_the_calls(coordinator: CoordinatorMetrics) -> None:
    coordinator.round(1)
    coordinator.update_accepted()
    coordinator.update_accepted()
    coordinator.update_rejected(RejectReason.NON_FINITE.label)
    coordinator.update_rejected(RejectReason.WRONG_ROUND.label)
    coordinator.update_rejected(RejectReason.NON_FINITE.label)
    coordinator.bytes_received(1000)
    coordinator.bytes_received(24)
    coordinator.bytes_sent(4096)
    coordinator.clients(registered=5, active=3)
    coordinator.privacy_epsilon(0.75)
    coordinator.accuracy(0.9)
    coordinator.round_completed(2.0)
    coordinator.round_completed(40.0)

    out = coordinator.render()
    assert value(out, "fedkube_rounds_total") == 2
    assert value(out, "fedkube_round_duration_seconds_count") == 2
    assert value(out, "fedkube_round_duration_seconds_sum") == 42.0
    # 2 s falls in the 2.5 s bucket, 40 s only from the 60 s bucket on.
    assert value(out, "fedkube_round_duration_seconds_bucket", le="2.5") == 1
    assert value(out, "fedkube_round_duration_seconds_bucket", le="60.0") == 2
    assert value(out, "fedkube_updates_accepted_total") == 2
    assert value(out, "fedkube_updates_rejected_total", reason="non_finite") == 2
    assert value(out, "fedkube_updates_rejected_total", reason="wrong_round") == 1
    assert value(out, "fedkube_bytes_received_total") == 1024
    assert value(out, "fedkube_bytes_sent_total") == 4096
    assert value(out, "fedkube_clients_registered") == 5
    assert value(out, "fedkube_clients_active") == 3
    assert value(out, "fedkube_privacy_epsilon") == 0.75
    assert value(out, "fedkube_model_accuracy") == 0.9
    assert value(out, "fedkube_round_current") == 1


def test_per_client_figures_follow_the_client_status(coordinator: CoordinatorMetrics) -> None:
    coordinator.client("sim-000", ClientNodeStatus(
        last_round_seconds=1.5, local_loss=0.4, local_accuracy=0.9, bytes_up=1200,
        rejections={"norm_bound": 1, "bad_shape": 1}, rounds_participated=3))
    coordinator.client("sim-001", ClientNodeStatus())  # nothing reported yet
    text = coordinator.render()
    assert value(text, "fedkube_client_round_duration_seconds", client="sim-000") == 1.5
    assert value(text, "fedkube_client_local_accuracy", client="sim-000") == 0.9
    assert value(text, "fedkube_client_bytes_received", client="sim-000") == 1200
    assert value(text, "fedkube_client_rejections", client="sim-000") == 2
    assert value(text, "fedkube_client_rounds_participated", client="sim-001") == 0
    assert ("fedkube_client_local_loss", frozenset({("client", "sim-001")})) not in samples(text)


def test_per_client_series_stop_at_the_documented_limit(coordinator: CoordinatorMetrics) -> None:
    for index in range(MAX_CLIENT_SERIES + 7):
        coordinator.client(f"node-{index}", ClientNodeStatus(bytes_up=index))
    coordinator.client("node-0", ClientNodeStatus(bytes_up=99))  # tracked ones keep moving
    labelled = {labels for (name, labels) in samples(coordinator.render())
                if name == "fedkube_client_bytes_received"}
    assert len(labelled) == MAX_CLIENT_SERIES
    text = coordinator.render()
    assert value(text, "fedkube_clients_untracked") == 7
    assert value(text, "fedkube_client_bytes_received", client="node-0") == 99


def test_gauges_go_down_as_well_as_up(coordinator: CoordinatorMetrics) -> None:
    coordinator.clients(registered=8, active=8)
    coordinator.clients(registered=8, active=2)
    out = coordinator.render()
    assert value(out, "fedkube_clients_active") == 2
    assert value(out, "fedkube_clients_registered") == 8


def test_two_coordinators_in_one_process_keep_their_own_counts() -> None:
    first, second = CoordinatorMetrics(), CoordinatorMetrics()
    first.update_accepted()
    first.update_accepted()
    second.update_accepted()
    assert value(first.render(), "fedkube_updates_accepted_total") == 2
    assert value(second.render(), "fedkube_updates_accepted_total") == 1


def test_infinite_epsilon_is_exported(coordinator: CoordinatorMetrics) -> None:
    coordinator.privacy_epsilon(math.inf)
    assert value(coordinator.render(), "fedkube_privacy_epsilon") == math.inf


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: m.update_rejected("shape mismatch: conv1.weight"), "snake_case"),
        (lambda m: m.update_rejected(""), "snake_case"),
        (lambda m: m.bytes_received(-1), "bytes received"),
        (lambda m: m.bytes_sent(-5), "bytes sent"),
        (lambda m: m.accuracy(1.5), r"\[0, 1\]"),
        (lambda m: m.privacy_epsilon(-0.1), "epsilon"),
        (lambda m: m.privacy_epsilon(math.nan), "epsilon"),
        (lambda m: m.round_completed(-1.0), "duration"),
        (lambda m: m.round_completed(math.inf), "duration"),
        (lambda m: m.clients(registered=2, active=3), "exceed"),
        (lambda m: m.round(-1), "round"),
    ],
)
def test_nonsense_is_refused_and_nothing_is_recorded(coordinator: CoordinatorMetrics, call,
                                                     match: str) -> None:
    before = coordinator.render()
    with pytest.raises(ValueError, match=match):
        call(coordinator)
    assert coordinator.render() == before


def test_coordinator_endpoint_serves_moving_counters(coordinator: CoordinatorMetrics) -> None:
    port = coordinator.serve(0, host="127.0.0.1")
    assert port > 0
    coordinator.update_accepted()
    content_type, body = scrape(port)
    assert content_type.startswith("text/plain")
    assert value(body, "fedkube_updates_accepted_total") == 1

    coordinator.update_accepted()
    coordinator.bytes_received(512)
    coordinator.round_completed(0.3)
    _, body = scrape(port)
    assert value(body, "fedkube_updates_accepted_total") == 2
    assert value(body, "fedkube_bytes_received_total") == 512
    assert value(body, "fedkube_rounds_total") == 1


def test_serving_twice_is_refused_and_close_frees_the_port(coordinator: CoordinatorMetrics) -> None:
    port = coordinator.serve(0, host="127.0.0.1")
    with pytest.raises(RuntimeError, match=str(port)):
        coordinator.serve(0, host="127.0.0.1")
    coordinator.close()
    with pytest.raises(OSError):
        scrape(port)
    again = coordinator.serve(port, host="127.0.0.1")
    assert again == port
    assert "fedkube_rounds_total" in scrape(port)[1]


# ------------------------------------------------------------------ operator


def test_every_phase_is_exported_from_the_start(operator_metrics: OperatorMetrics) -> None:
    out = operator_metrics.render()
    for phase in Phase:
        assert value(out, "fedkube_operator_federatedjobs", phase=phase.value) == 0
    for client_phase in ClientPhase:
        assert value(out, "fedkube_operator_clientnodes", phase=client_phase.value) == 0


def test_job_phases_are_counted_per_object(operator_metrics: OperatorMetrics) -> None:
    m = operator_metrics
    m.job_phase("team-a", "digits", Phase.pending)
    m.job_phase("team-a", "digits", "Running")
    m.job_phase("team-a", "digits", Phase.running)  # kopf resumed the watch: same event again
    m.job_phase("team-b", "digits", Phase.running)  # same name, other namespace
    m.job_phase("team-a", "mnist", Phase.failed)
    out = m.render()
    assert value(out, "fedkube_operator_federatedjobs", phase="Pending") == 0
    assert value(out, "fedkube_operator_federatedjobs", phase="Running") == 2
    assert value(out, "fedkube_operator_federatedjobs", phase="Failed") == 1

    m.job_phase("team-a", "digits", None)
    m.job_phase("team-a", "never-seen", None)
    out = m.render()
    assert value(out, "fedkube_operator_federatedjobs", phase="Running") == 1


def test_offline_client_nodes_are_visible(operator_metrics: OperatorMetrics) -> None:
    m = operator_metrics
    m.client_phase("edge", "mac-1", ClientPhase.ready)
    m.client_phase("edge", "mac-2", ClientPhase.ready)
    m.client_phase("edge", "mac-2", ClientPhase.offline)
    out = m.render()
    assert value(out, "fedkube_operator_clientnodes", phase="Offline") == 1
    assert value(out, "fedkube_operator_clientnodes", phase="Ready") == 1


def test_unknown_phase_is_refused(operator_metrics: OperatorMetrics) -> None:
    with pytest.raises(ValueError):
        operator_metrics.job_phase("ns", "job", "Exploded")


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (kopf.TemporaryError("coordinator not up yet", delay=5), Outcome.TEMPORARY_ERROR),
        (kopf.PermanentError("bad spec"), Outcome.PERMANENT_ERROR),
        (RuntimeError("API server hiccup"), Outcome.ERROR),
    ],
)
def test_reconciliation_counts_kopf_error_matrix_and_reraises(
    operator_metrics: OperatorMetrics, error: Exception, outcome: str
) -> None:
    with pytest.raises(type(error)) as raised, operator_metrics.reconciliation("create_job"):
        raise error
    assert raised.value is error
    out = operator_metrics.render()
    assert value(out, "fedkube_operator_reconciliations_total",
                 handler="create_job", outcome=outcome) == 1
    assert value(out, "fedkube_operator_reconcile_duration_seconds_count",
                 handler="create_job") == 1


def test_successful_reconciliations_accumulate(operator_metrics: OperatorMetrics) -> None:
    for _ in range(3):
        with operator_metrics.reconciliation("watch_status"):
            pass
    assert value(operator_metrics.render(), "fedkube_operator_reconciliations_total",
                 handler="watch_status", outcome=Outcome.SUCCESS) == 3


def test_operator_endpoint_serves_over_http() -> None:
    metrics, port = serve_operator_metrics(0, host="127.0.0.1")
    try:
        metrics.job_phase("default", "digits", Phase.running)
        _, body = scrape(port)
        assert value(body, "fedkube_operator_federatedjobs", phase="Running") == 1
        metrics.job_phase("default", "digits", Phase.succeeded)
        _, body = scrape(port)
        assert value(body, "fedkube_operator_federatedjobs", phase="Running") == 0
        assert value(body, "fedkube_operator_federatedjobs", phase="Succeeded") == 1
    finally:
        metrics.close()


def test_reject_reason_labels_are_the_protocols_reasons_and_nothing_else() -> None:
    assert set(REASON_LABELS) == {reason.label for reason in RejectReason}
    metrics = CoordinatorMetrics()
    with pytest.raises(ValueError, match="one of"):
        metrics.update_rejected("made_up_reason")
