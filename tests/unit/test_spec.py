"""The API models: what validates, what is refused and how the refusal reads."""

from __future__ import annotations

from pathlib import Path

import pytest
from fedkube.runtime.spec import (
    FederatedJobSpec,
    ManifestError,
    load_job,
    parse_job,
    parse_job_spec,
    upsert_condition,
)
from hypothesis import given
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]


def _job(**spec):
    return {"apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
            "metadata": {"name": "j"}, "spec": {"model": "mlp", **spec}}


def test_defaults_and_camel_case_round_trip() -> None:
    job = parse_job(_job(clientsPerRound=4, roundTimeoutSeconds=5))
    assert job.spec.clients_per_round == 4 and job.spec.round_timeout_seconds == 5
    wire = job.spec.to_wire()
    assert wire["clientsPerRound"] == 4 and "clients_per_round" not in wire
    assert FederatedJobSpec.model_validate(wire) == job.spec


@pytest.mark.parametrize(("spec", "message"), [
    ({"rounds": 0}, "spec.rounds: Input should be greater than or equal to 1"),
    ({"clientsPerRound": 2, "fraction": 0.5}, "set clientsPerRound or fraction, not both"),
    ({"data": {"dataset": "mnist"}}, "spec.data: path is required for dataset 'mnist'"),
    ({"privacy": {"mode": "central", "targetEpsilon": 1}, "strategy": {"name": "krum"}},
     "strategy.name 'krum' cannot be combined with privacy.mode central: DP-FedAvg noise"),
    ({"simulation": {"clients": 3}, "clientsPerRound": 5},
     "clientsPerRound (5) exceeds simulation.clients (3)"),
    ({"privacy": {"mode": "local", "targetEpsilon": 1, "delta": 1.5}},
     "spec.privacy.delta: Input should be less than 1"),
    ({"coordinator": {"port": 70000}}, "spec.coordinator.port"),
    ({"compression": {"errorFeedback": True, "lossless": "zstd"}},
     "spec.compression: errorFeedback needs topK or quantizeBits below 32"),
    ({"compression": {"quantizeBits": 12}}, "spec.compression.quantizeBits"),
    ({"compression": {"topK": 1.0}}, "spec.compression.topK: Input should be less than 1"),
    ({"secureAggregation": {"enabled": True}, "minClients": 2,
      "compression": {"topK": 0.1}},
     "compression.topK cannot be combined with secureAggregation.enabled"),
    ({"secureAggregation": {"enabled": True}, "minClients": 2, "strategy": {"name": "median"}},
     ("strategy.name 'median' cannot be combined with secureAggregation.enabled: the server "
      "sees only the masked sum")),
    ({"secureAggregation": {"enabled": True}}, "secureAggregation.enabled needs minClients >= 2"),
    ({"secureAggregation": {"threshold": 0.5}},
     "spec.secureAggregation.threshold: Input should be greater than 0.5"),
    ({"secureAggregation": {"neighbours": 1}},
     "spec.secureAggregation.neighbours: Input should be greater than or equal to 2"),
    ({"secureAggregation": {"enabled": True, "valueRange": 1e7}, "minClients": 2},
     "secureAggregation.valueRange 10000000.0 times 1000 clients does not fit the 32-bit ring"),
])
def test_bad_specs_name_the_field_and_the_reason(spec, message) -> None:
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_job(_job(**spec))


def test_operator_view_prefixes_spec() -> None:
    with pytest.raises(ManifestError, match=r"^spec\.batchSize: "):
        parse_job_spec({"model": "mlp", "batchSize": 0})


def test_bad_metadata_name_is_refused() -> None:
    bad = _job()
    bad["metadata"]["name"] = "Not_A_DNS_Name"
    with pytest.raises(ManifestError, match="metadata.name"):
        parse_job(bad)


@given(live=st.integers(0, 500), per_round=st.integers(1, 50),
       fraction=st.floats(0.01, 1.0), min_clients=st.integers(1, 10))
def test_clients_to_select_never_exceeds_what_is_live(live, per_round, fraction,
                                                      min_clients) -> None:
    by_count = FederatedJobSpec(model="mlp", clients_per_round=max(per_round, min_clients),
                                min_clients=min_clients)
    by_fraction = FederatedJobSpec(model="mlp", fraction=fraction, min_clients=min_clients)
    assert by_count.clients_to_select(live) <= live
    assert min(live, min_clients) <= by_fraction.clients_to_select(live) <= max(live, min_clients)


def test_conditions_are_upserted_by_type_and_transition_time_moves_on_flips_only() -> None:
    first = upsert_condition([], type="Ready", status="True", reason="A", message="",
                             now="t1")
    same = upsert_condition(first, type="Ready", status="True", reason="B", message="m",
                            now="t2")
    flipped = upsert_condition(same, type="Ready", status="False", reason="C", message="",
                               now="t3")
    other = upsert_condition(flipped, type="Degraded", status="True", reason="D",
                             message="", now="t4")
    assert [c.last_transition_time for c in (first[0], same[0], flipped[0])] == [
        "t1", "t1", "t3"]
    assert same[0].reason == "B" and len(same) == 1
    assert [c.type for c in other] == ["Ready", "Degraded"]
    assert first[0].reason == "A"  # inputs are not mutated


def test_every_example_loads() -> None:
    for example in (REPO / "examples").glob("*.yaml"):
        assert load_job(example).metadata.name == example.stem
