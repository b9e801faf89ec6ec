"""Secure aggregation at the seams: the plan carries it, every protocol message survives
its protobuf round trip, and the coordinator maps the spec to the protocol's config and
central DP to each client's noise share."""

from __future__ import annotations

import math

import pytest
from fedkube.runtime.coordinator.secure_round import distributed_noise_std, secure_config
from fedkube.runtime.plan import SecurePlan, plan_for
from fedkube.runtime.secagg import SecAggClient, SecAggConfig, SecAggServer
from fedkube.runtime.spec import parse_job_spec
from fedkube.runtime.wire import convert


def _spec(**extra):
    return parse_job_spec({"model": "mlp", "minClients": 3, "roundTimeoutSeconds": 40,
                           "secureAggregation": {"enabled": True, "threshold": 0.75,
                                                 "neighbours": 6}, **extra})


def test_the_plan_carries_secure_aggregation_through_protobuf() -> None:
    plan = plan_for(_spec(privacy={"mode": "central", "targetEpsilon": 2.0,
                                   "maxGradNorm": 0.7}),
                    round=2, model_version=1, now=0.0, client_parameters={},
                    distributed_noise_std=0.25)
    assert plan.secure == SecurePlan(clip_norm=0.7, noise_std=0.25)
    assert convert.plan_from_pb(convert.plan_to_pb(plan)) == plan
    plain = plan_for(parse_job_spec({"model": "mlp"}), round=1, model_version=0, now=0.0,
                     client_parameters={})
    assert plain.secure is None and convert.plan_from_pb(convert.plan_to_pb(plain)).secure is None
    local = plan_for(_spec(privacy={"mode": "local", "targetEpsilon": 2.0}), round=1,
                     model_version=0, now=0.0, client_parameters={}, distributed_noise_std=9.0)
    assert local.secure == SecurePlan()  # local DP composes as is: no extra clip or noise


def test_every_protocol_message_survives_its_protobuf_round_trip() -> None:
    nodes = ["a", "b", "c"]
    server = SecAggServer(round=1, selected=nodes, length=5, config=SecAggConfig(), seed=0)
    clients = {n: SecAggClient(n, 1) for n in nodes}
    for client in clients.values():
        advert = client.advertise()
        assert convert.advert_from_pb(convert.advert_to_pb(advert)) == advert
        server.receive_advert(advert)
    for node, roster in server.close_advertising().items():
        assert convert.roster_from_pb(convert.roster_to_pb(roster)) == roster
        bundle = clients[node].share(roster)
        assert convert.bundle_from_pb(convert.bundle_to_pb(bundle)) == bundle
        server.receive_shares(bundle)
    for node, delivery in server.close_sharing().items():
        assert convert.delivery_from_pb(convert.delivery_to_pb(delivery)) == delivery
        server.receive_masked(clients[node].mask(delivery, [0.0] * 5))
    for node, request in server.close_masking().items():
        assert convert.unmask_request_from_pb(convert.unmask_request_to_pb(request)) == request
        response = clients[node].unmask(request)
        assert convert.unmask_response_from_pb(convert.unmask_response_to_pb(response)) == response


def test_the_spec_maps_to_the_protocol_config_and_central_dp_to_noise_shares() -> None:
    config = secure_config(_spec())
    assert (config.threshold, config.neighbours, config.min_clients) == (0.75, 6, 3)
    assert config.deadlines.masked_input == 40 and config.deadlines.advertise == 10
    # Any 4 survivors' shares sum to the central std z * C; more survivors only add noise.
    share = distributed_noise_std(noise_multiplier=1.2, clip_norm=0.5, guaranteed_survivors=4)
    assert share == pytest.approx(1.2 * 0.5 / 2)
    assert math.sqrt(4 * share**2) == pytest.approx(1.2 * 0.5)
    with pytest.raises(ValueError, match="guaranteed_survivors must be >= 1"):
        distributed_noise_std(noise_multiplier=1.0, clip_norm=1.0, guaranteed_survivors=0)
