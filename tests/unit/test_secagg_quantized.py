"""Quantization as the fixed-point step of secure aggregation (compression.quantizeBits):
unbiased stochastic codes on a scale the round shares, the smallest ring that holds the
sum, the fewest bytes on the wire, masks that cancel in that ring, and the spec refusals."""

from __future__ import annotations

import numpy as np
import pytest
from fedkube.runtime.secagg import (
    MaskedInput,
    Phase,
    ProtocolError,
    Quantized,
    Refusal,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    encoding_for,
    from_wire,
    to_wire,
)
from fedkube.runtime.secagg.simulate import dither_rng, run_round
from fedkube.runtime.spec import FederatedJobSpec
from scipy import stats

LENGTH = 301


def _updates(n: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"node-{i:03d}": rng.normal(0.0, 0.3, LENGTH) for i in range(n)}


@pytest.mark.parametrize(("bits", "clients", "ring_bits", "width"), [
    (8, 100, 15, 2), (8, 8, 11, 2), (2, 100, 8, 1), (4, 100, 11, 2), (16, 100, 23, 3),
    (16, 1000, 26, 4)])
def test_the_ring_is_the_smallest_that_holds_the_sum_of_codes(bits, clients, ring_bits,
                                                             width) -> None:
    encoding = Quantized(1.0, clients, bits)
    assert 2 * clients * encoding.levels + 1 <= 2 ** encoding.ring_bits
    assert 2 * clients * encoding.levels + 1 > 2 ** (encoding.ring_bits - 1)
    assert (encoding.ring_bits, encoding.width) == (ring_bits, width)


def test_a_ring_over_32_bits_is_refused_naming_the_remedy() -> None:
    with pytest.raises(ValueError, match="lower quantizeBits"):
        Quantized(1.0, 200_000, 16)


def test_sum_of_dequantized_codes_is_the_dequantized_sum_of_codes() -> None:
    """Exact: the ring holds the sum of every client's codes without wrapping, even at
    the extremes (every client at +valueRange or -valueRange)."""
    encoding = Quantized(1.0, 50, 8)
    rng = np.random.default_rng(3)
    updates = [rng.uniform(-1.5, 1.5, LENGTH) for _ in range(49)] + [np.full(LENGTH, -9.0)]
    codes = [encoding.encode(u, rng) for u in updates]
    total = np.zeros(LENGTH, np.uint32)
    for code in codes:
        total += code
    integer_codes = [np.rint(encoding.dequantize(c) * encoding.scale).astype(np.int64)
                     for c in codes]
    assert all(np.abs(c).max() <= encoding.levels for c in integer_codes)
    assert np.array_equal(encoding.decode(total), sum(integer_codes) / encoding.scale)
    assert np.allclose(encoding.decode(total), sum(encoding.dequantize(c) for c in codes),
                       rtol=0, atol=1e-9)
    extreme = np.zeros(LENGTH, np.uint32)
    for _ in range(50):
        extreme += encoding.encode(np.full(LENGTH, -7.0), rng)
    assert np.array_equal(encoding.decode(extreme), np.full(LENGTH, -50.0))


def test_stochastic_rounding_is_unbiased() -> None:
    """The mean of many encodings of one vector is the (clipped) vector, within a z-test
    bound on every coordinate, though each code is off by up to one step."""
    encoding = Quantized(1.0, 4, 4)  # step 1/7: coarse, so a bias would show
    rng = np.random.default_rng(5)
    values = rng.uniform(-1.2, 1.2, 64)
    draws = np.stack([encoding.dequantize(encoding.encode(values, rng)) for _ in range(4000)])
    clipped = np.clip(values, -1.0, 1.0)
    assert np.abs(draws - clipped).max() <= encoding.resolution + 1e-12
    standard_error = draws.std(axis=0, ddof=1) / np.sqrt(len(draws)) + 1e-12
    z = (draws.mean(axis=0) - clipped) / standard_error
    assert stats.kstest(z[np.abs(clipped) < 1.0], "norm").pvalue > 1e-3
    assert np.abs(draws.mean(axis=0) - clipped).max() < 0.01


def test_wire_bytes_round_trip_and_refuse_the_wrong_length() -> None:
    vector = np.random.default_rng(0).integers(0, 1 << 15, LENGTH).astype(np.uint32)
    data = to_wire(vector, 2)
    assert data.dtype == np.uint8 and data.size == 2 * LENGTH
    assert np.array_equal(from_wire(data, 2, LENGTH), vector)
    three = np.random.default_rng(2).integers(0, 1 << 23, LENGTH).astype(np.uint32)
    assert np.array_equal(from_wire(to_wire(three, 3), 3, LENGTH), three)
    full = np.random.default_rng(1).integers(0, 1 << 32, LENGTH, dtype=np.uint64)
    assert np.array_equal(from_wire(to_wire(full.astype(np.uint32), 4), 4, LENGTH), full)
    with pytest.raises(ValueError, match="not 301 ring elements"):
        from_wire(data[:-1], 2, LENGTH)


@pytest.mark.parametrize("bits", [8, 2])
def test_a_quantized_secure_round_releases_the_sum_of_codes(bits: int) -> None:
    """Masks cancel in Z_2^b; with a dropout after sharing the sum is still exactly the
    survivors' dequantized codes (the same dither as the clients drew)."""
    updates = _updates(8)
    config = SecAggConfig(value_range=1.0, quantize_bits=bits)
    result = run_round(updates, config=config, seed=7,
                       drop_before={"node-003": Phase.MASKED_INPUT})
    encoding = encoding_for(1.0, 8, bits)
    codes = sum(np.rint(encoding.dequantize(encoding.encode(updates[n], dither_rng(7, n)))
                        * encoding.scale).astype(np.int64) for n in result.survivors)
    assert "node-003" not in result.survivors and len(result.survivors) == 7
    assert np.array_equal(result.total, codes / encoding.scale)
    clipped = sum(np.clip(updates[n], -1.0, 1.0) for n in result.survivors)
    assert np.abs(result.total - clipped).max() <= 7 * encoding.resolution


def test_a_quantized_masked_input_is_uniform_in_its_ring_and_out_of_ring_is_refused() -> None:
    nodes = [f"node-{i:03d}" for i in range(3)]
    length = 1 << 15
    server = SecAggServer(round=1, selected=nodes, length=length,
                          config=SecAggConfig(quantize_bits=8), seed=1)
    clients = {n: SecAggClient(n, 1, quantize_bits=8) for n in nodes}
    for client in clients.values():
        server.receive_advert(client.advertise())
    for node, roster in server.close_advertising().items():
        server.receive_shares(clients[node].share(roster))
    deliveries = server.close_sharing()
    ring_bits = server.encoding.ring_bits
    assert ring_bits == 10 and server.encoding.width == 2  # 3 clients x ±127
    masked = clients["node-000"].mask(deliveries["node-000"], np.zeros(length)).vector
    assert int(masked.max()) < 1 << ring_bits
    counts = np.bincount((masked >> (ring_bits - 8)).astype(np.int64), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-4  # the top byte of the ring: uniform
    bad = masked.copy()
    bad[5] = 1 << ring_bits
    with pytest.raises(ProtocolError) as refused:
        server.receive_masked(MaskedInput("node-000", 1, bad))
    assert refused.value.refusal is Refusal.MALFORMED and "outside the ring" in str(refused.value)
    server.receive_masked(MaskedInput("node-000", 1, masked))  # the honest one still goes in


def _spec(**compression) -> dict:
    return {"model": "mlp", "data": {"dataset": "digits"}, "rounds": 1, "minClients": 2,
            "simulation": {"clients": 4},
            "secureAggregation": {"enabled": True, "valueRange": 1.0},
            "compression": compression}


def test_quantization_composes_with_secure_aggregation_in_the_spec() -> None:
    for bits in (16, 8, 4, 2):
        assert FederatedJobSpec.model_validate(_spec(quantizeBits=bits)).compression.quantize_bits == bits


@pytest.mark.parametrize(("compression", "field"), [
    ({"topK": 0.1}, "compression.topK"),
    ({"lossless": "zstd"}, "compression.lossless"),
    ({"quantizeBits": 8, "errorFeedback": True}, "compression.errorFeedback"),
    ({"quantizeBits": 8, "adaptive": {"targetUploadSeconds": 1.0}}, "compression.adaptive"),
])
def test_what_cannot_compose_with_secure_aggregation_is_refused_naming_the_fields(
        compression: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field) as refused:
        FederatedJobSpec.model_validate(_spec(**compression))
    assert "secureAggregation.enabled" in str(refused.value)
