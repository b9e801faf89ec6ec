"""Secure aggregation, pure protocol: primitives, reconstruction, mask cancellation, the
sum exact to quantization, dropouts in every phase, hostile messages, and a statistical
test that what the coordinator holds of one client is uniform in Z_2^32."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import numpy as np
import pytest
from fedkube.runtime.secagg import (
    FixedPoint,
    MaskedInput,
    Phase,
    ProtocolError,
    Refusal,
    RevealedShare,
    RoundFailed,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    ShareBundle,
    ShareDelivery,
    UnmaskRequest,
    build_graph,
    neighbour_count,
    primitives,
    shamir,
    share_threshold,
)
from fedkube.runtime.secagg.simulate import run_round
from scipy import stats

LENGTH = 257


def _updates(n: int, *, seed: int = 0, length: int = LENGTH) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"node-{i:03d}": rng.normal(0.0, 0.7, length) for i in range(n)}


def _quantized_sum(updates: Mapping[str, np.ndarray], nodes, encoding: FixedPoint) -> np.ndarray:
    """The exact sum the protocol must release: each update clipped and rounded alone."""
    units = sum(np.rint(np.clip(updates[n], -encoding.value_range, encoding.value_range)
                        * encoding.scale).astype(np.int64) for n in nodes)
    return units / encoding.scale


# ---------------------------------------------------------------- primitives


def test_shamir_any_t_shares_reconstruct_and_fewer_do_not() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, threshold=4, holders=7)
    rng = np.random.default_rng(1)
    for _ in range(5):
        chosen = [shares[i] for i in rng.choice(7, size=4, replace=False)]
        assert shamir.combine(chosen, threshold=4) == secret
    with pytest.raises(shamir.ShareError, match="3 distinct shares"):
        shamir.combine(shares[:3], threshold=4)
    # t - 1 shares plus a made-up one interpolate to no 32-byte value (or to another one)
    forged = [*shares[:3], (shares[3][0], os.urandom(shamir.SHARE_BYTES - 1).rjust(66, b"\0"))]
    try:
        assert shamir.combine(forged, threshold=4) != secret
    except shamir.ShareError as error:
        assert "inconsistent shares" in str(error)


def test_key_agreement_is_symmetric_and_bound_to_label_and_round() -> None:
    a, b = primitives.KeyPair.generate(), primitives.KeyPair.generate()
    ab = primitives.agree(a.private, b.public, label=b"mask", round=3)
    assert ab == primitives.agree(b.private, a.public, label=b"mask", round=3)
    assert ab != primitives.agree(b.private, a.public, label=b"mask", round=4)
    assert ab != primitives.agree(b.private, a.public, label=b"share", round=3)
    assert primitives.public_of(a.private) == a.public


def test_sealed_share_refuses_tampering_and_replay_under_other_associated_data() -> None:
    key = os.urandom(32)
    nonce, ciphertext = primitives.seal(key, b"share", associated=b"r1|a|b")
    assert primitives.open_sealed(key, nonce, ciphertext, associated=b"r1|a|b") == b"share"
    with pytest.raises(primitives.CryptoError, match="authentication"):
        primitives.open_sealed(key, nonce, ciphertext, associated=b"r1|a|c")
    flipped = bytes([ciphertext[0] ^ 1]) + ciphertext[1:]
    with pytest.raises(primitives.CryptoError, match="authentication"):
        primitives.open_sealed(key, nonce, flipped, associated=b"r1|a|b")


def test_prg_is_deterministic_per_seed() -> None:
    seed = os.urandom(32)
    assert np.array_equal(primitives.expand(seed, 100), primitives.expand(seed, 100))
    assert not np.array_equal(primitives.expand(seed, 100), primitives.expand(os.urandom(32), 100))
    with pytest.raises(primitives.CryptoError, match="seed must be 32 bytes"):
        primitives.expand(b"short", 4)


def test_fixed_point_sum_is_exact_to_quantization_and_refuses_nan() -> None:
    encoding = FixedPoint(value_range=2.0, clients=10)
    updates = _updates(10)
    total = sum((encoding.encode(u) for u in updates.values()), np.zeros(LENGTH, np.uint32))
    assert np.array_equal(encoding.decode(total), _quantized_sum(updates, updates, encoding))
    exact = sum(np.clip(u, -2.0, 2.0) for u in updates.values())
    assert np.abs(encoding.decode(total) - exact).max() <= 10 * encoding.resolution
    with pytest.raises(ValueError, match="NaN or infinite"):
        encoding.encode(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="lower valueRange"):
        FixedPoint(value_range=1e9, clients=10)


def test_neighbour_graph_is_symmetric_regular_and_logarithmic() -> None:
    nodes = [f"n{i}" for i in range(200)]
    graph = build_graph(nodes, neighbours=None, seed=7)
    degrees = {len(peers) for peers in graph.values()}
    assert degrees == {neighbour_count(200, None)} and neighbour_count(200, None) == 18
    assert all(node in graph[peer] for node, peers in graph.items() for peer in peers)
    assert graph == build_graph(reversed(nodes), neighbours=None, seed=7)
    assert graph != build_graph(nodes, neighbours=None, seed=8)
    assert neighbour_count(5, None) == 4  # small rounds: every pair (Bonawitz et al.)
    assert share_threshold(18, 0.67) == 13
    with pytest.raises(ValueError, match=r"threshold must be in \(0.5, 1\]"):
        share_threshold(18, 0.5)


# ---------------------------------------------------------------- whole rounds


@pytest.mark.parametrize("neighbours", [None, 4], ids=["complete", "sparse"])
def test_masks_cancel_and_the_sum_is_exact_to_quantization(neighbours: int | None) -> None:
    updates = _updates(12)
    result = run_round(updates, config=SecAggConfig(neighbours=neighbours, threshold=0.75))
    assert result.survivors == tuple(sorted(updates)) and result.dropped == ()
    encoding = FixedPoint(4.0, 12)
    assert np.array_equal(result.total, _quantized_sum(updates, updates, encoding))


@pytest.mark.parametrize("phase", [Phase.ADVERTISE, Phase.SHARE, Phase.MASKED_INPUT,
                                   Phase.UNMASK])
def test_a_dropout_in_each_phase_is_recovered(phase: Phase) -> None:
    updates = _updates(16, seed=3)
    leaving = {"node-002": phase, "node-011": phase}
    result = run_round(updates, config=SecAggConfig(neighbours=8, threshold=0.7),
                       drop_before=leaving)
    # Who dropped after sending a masked input is still in the sum (its input arrived).
    in_sum = set(updates) - (set() if phase is Phase.UNMASK else set(leaving))
    assert set(result.survivors) == in_sum
    clients = 16 - (2 if phase is Phase.ADVERTISE else 0)
    assert np.array_equal(result.total, _quantized_sum(updates, in_sum, FixedPoint(4.0, clients)))


def test_dropouts_in_every_phase_of_one_round() -> None:
    updates = _updates(20, seed=4)
    leaving = {"node-001": Phase.ADVERTISE, "node-005": Phase.SHARE,
               "node-009": Phase.MASKED_INPUT, "node-013": Phase.UNMASK}
    result = run_round(updates, config=SecAggConfig(neighbours=None, threshold=0.6),
                       drop_before=leaving)
    in_sum = set(updates) - {"node-001", "node-005", "node-009"}
    assert set(result.dropped) == {"node-001", "node-005", "node-009"}
    assert np.array_equal(result.total, _quantized_sum(updates, in_sum, FixedPoint(4.0, 19)))


def test_more_dropouts_than_k_minus_t_in_a_neighbourhood_fail_the_round_cleanly() -> None:
    updates = _updates(6, seed=5)  # complete graph: k = 5, t = ceil(0.8 * 5) = 4
    leaving = {"node-000": Phase.MASKED_INPUT, "node-001": Phase.UNMASK,
               "node-002": Phase.UNMASK}
    with pytest.raises(RoundFailed, match="shares of .* 4 needed"):
        run_round(updates, config=SecAggConfig(threshold=0.8), drop_before=leaving)
    with pytest.raises(RoundFailed, match="fewer than the 5 needed"):
        run_round(updates, config=SecAggConfig(min_clients=5),
                  drop_before={"node-000": Phase.SHARE, "node-001": Phase.SHARE})


def test_phase_deadlines_close_a_phase_without_the_missing_clients() -> None:
    now = [0.0]
    config = SecAggConfig()
    server = SecAggServer(round=1, selected=["a", "b", "c"], length=4, config=config,
                          seed=0, clock=lambda: now[0])
    for node in ("a", "b"):
        server.receive_advert(SecAggClient(node, 1).advertise())
    assert server.expected() == {"c"} and not server.expired()
    now[0] = config.deadlines.advertise
    assert server.expired()
    assert set(server.close_advertising()) == {"a", "b"}
    assert server.phase is Phase.SHARE and server.deadline == now[0] + config.deadlines.share
    with pytest.raises(ProtocolError, match="advertise message while phase share") as error:
        server.receive_advert(SecAggClient("c", 1).advertise())
    assert error.value.refusal is Refusal.WRONG_PHASE


# ------------------------------------------------------------ what the server holds


def _to_masked_input(n: int, length: int = LENGTH) -> tuple[
        SecAggServer, dict[str, SecAggClient], dict[str, ShareDelivery]]:
    """A round of n clients (complete graph) with its shares delivered."""
    nodes = [f"node-{i:03d}" for i in range(n)]
    server = SecAggServer(round=1, selected=nodes, length=length, config=SecAggConfig(), seed=1)
    clients = {node: SecAggClient(node, 1) for node in nodes}
    for client in clients.values():
        server.receive_advert(client.advertise())
    for node, roster in server.close_advertising().items():
        server.receive_shares(clients[node].share(roster))
    return server, clients, server.close_sharing()


def test_one_clients_masked_input_is_uniform_in_the_ring() -> None:
    """Proof-style: what the coordinator receives of one client, here an all-zero update
    (the most structured input there is), passes a chi-square test of uniformity on its
    top and bottom byte, while the unmasked encoding fails it outright."""
    length = 1 << 16
    _, clients, deliveries = _to_masked_input(3, length)
    masked = clients["node-000"].mask(deliveries["node-000"], np.zeros(length)).vector
    for byte in (masked >> 24, masked & 0xFF):
        counts = np.bincount(byte.astype(np.int64), minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-4
    plain = FixedPoint(4.0, 3).encode(np.zeros(length))
    assert stats.chisquare(np.bincount((plain >> 24).astype(np.int64), minlength=256)).pvalue < 1e-9


def test_the_server_keeps_one_running_sum_and_no_clients_vector() -> None:
    server, clients, deliveries = _to_masked_input(5)
    updates = _updates(5)
    for node, delivery in deliveries.items():
        masked = clients[node].mask(delivery, updates[node])
        server.receive_masked(masked)
        arrays = [v for v in _walk(vars(server)) if isinstance(v, np.ndarray)]
        assert len(arrays) == 1 and arrays[0] is server._total
        assert not np.shares_memory(arrays[0], masked.vector)


def _walk(value):
    yield value
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from _walk(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _walk(getattr(value, field.name))


# -------------------------------------------------------------- hostile input


def test_hostile_protocol_messages_are_refused_with_a_reason() -> None:
    server = SecAggServer(round=2, selected=["a", "b", "c"], length=8, config=SecAggConfig(),
                          seed=0)
    clients = {n: SecAggClient(n, 2) for n in "abc"}
    advert_a = clients["a"].advertise()
    server.receive_advert(advert_a)
    cases = [
        (lambda: server.receive_advert(advert_a), Refusal.DUPLICATE, "already answered"),
        (lambda: server.receive_advert(SecAggClient("z", 2).advertise()),
         Refusal.NOT_PARTICIPANT, "'z' takes no part"),
        (lambda: server.receive_advert(SecAggClient("b", 3).advertise()), Refusal.WRONG_ROUND,
         "round 3"),
        (lambda: server.receive_advert(dataclasses.replace(clients["b"].advertise(),
                                                           mask_public=b"x" * 5)),
         Refusal.MALFORMED, "mask_public must be 32 bytes"),
        (lambda: server.receive_advert(dataclasses.replace(advert_a, node_id="c")),
         Refusal.FORGED, "replayed advertisement"),
    ]
    for call, refusal, message in cases:
        with pytest.raises(ProtocolError, match=message) as error:
            call()
        assert error.value.refusal is refusal


def test_shares_that_do_not_reconstruct_are_detected_and_the_honest_ones_used() -> None:
    updates = _updates(6, seed=8)
    server, clients, deliveries = _to_masked_input(6)
    for node, delivery in deliveries.items():
        if node != "node-000":  # node-000 drops: its mask key must be reconstructed
            server.receive_masked(clients[node].mask(delivery, updates[node]))
    requests = server.close_masking()
    liar = "node-001"
    for node, request in requests.items():
        response = clients[node].unmask(request)
        if node == liar:
            response = dataclasses.replace(response, key_shares=tuple(
                RevealedShare(s.owner, s.index, os.urandom(shamir.SHARE_BYTES - 1).rjust(66, b"\0"))
                for s in response.key_shares))
        server.receive_unmask(response)
    result = server.finish()  # five holders, t = 4: a subset without the liar reconstructs
    in_sum = set(updates) - {"node-000"}
    assert np.array_equal(result.total, _quantized_sum(updates, in_sum, FixedPoint(4.0, 6)))


def test_a_masked_input_of_the_wrong_length_or_type_is_refused() -> None:
    server, _, _ = _to_masked_input(3)
    for vector, message in ((np.zeros(LENGTH - 1, np.uint32), f"{LENGTH - 1} elements"),
                            (np.zeros(LENGTH, np.float32), "flat uint32")):
        with pytest.raises(ProtocolError, match=message) as error:
            server.receive_masked(MaskedInput("node-000", 1, vector))
        assert error.value.refusal is Refusal.BAD_SHAPE
    assert server.expected() == {"node-000", "node-001", "node-002"}


def test_a_client_refuses_forged_shares_and_requests_that_would_unmask_one_update() -> None:
    _, clients, deliveries = _to_masked_input(4)
    delivery = deliveries["node-000"]
    other = deliveries["node-001"].shares[0]  # addressed to node-001: replayed to node-000
    with pytest.raises(ProtocolError, match="not for this client") as error:
        clients["node-000"].mask(ShareDelivery(1, (*delivery.shares[1:], other)), np.zeros(LENGTH))
    assert error.value.refusal is Refusal.FORGED
    tampered = dataclasses.replace(delivery.shares[0], ciphertext=delivery.shares[0].ciphertext[::-1])
    with pytest.raises(ProtocolError, match="fails authentication"):
        clients["node-000"].mask(ShareDelivery(1, (tampered, *delivery.shares[1:])),
                                 np.zeros(LENGTH))
    client = clients["node-002"]
    client.mask(deliveries["node-002"], np.zeros(LENGTH))
    with pytest.raises(ProtocolError, match="both dropped and surviving") as error:
        client.unmask(UnmaskRequest(1, dropped=("node-000",), survivors=("node-000", "node-001")))
    assert error.value.refusal is Refusal.FORGED
    with pytest.raises(ProtocolError, match="refusing to unmask"):
        client.unmask(UnmaskRequest(1, dropped=("node-000", "node-001", "node-003"), survivors=()))


def test_a_client_lying_about_its_neighbours_is_refused() -> None:
    nodes = [f"node-{i:03d}" for i in range(10)]
    server = SecAggServer(round=1, selected=nodes, length=4,
                          config=SecAggConfig(neighbours=4), seed=2)
    clients = {node: SecAggClient(node, 1) for node in nodes}
    for client in clients.values():
        server.receive_advert(client.advertise())
    rosters = server.close_advertising()
    liar = "node-000"
    bundle = clients[liar].share(rosters[liar])
    stranger = next(n for n in nodes if n != liar and n not in
                    {p.node_id for p in rosters[liar].neighbours})
    forged = ShareBundle(liar, 1, bundle.seed_commitment, (
        *bundle.shares[1:], dataclasses.replace(bundle.shares[0], recipient=stranger)))
    with pytest.raises(ProtocolError, match="only to them") as error:
        server.receive_shares(forged)
    assert error.value.refusal is Refusal.FORGED
