"""runtime/compression: the quantizers are unbiased and round-trip within a step, top-k
keeps the largest entries, error feedback accounts for every bit not sent, lossless
framing round-trips, and malformed encodings are refused."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from fedkube.runtime.compression import (
    CompressionConfig,
    DecodedUpdate,
    EncodingError,
    compress_update,
    decode,
    decode_update,
    encode,
    parse,
)
from fedkube.runtime.compression.codec import raw_size
from hypothesis import given, settings
from hypothesis import strategies as st

FAST = settings(max_examples=30, deadline=None)

floats = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32)
vectors = st.lists(floats, min_size=1, max_size=300).map(
    lambda xs: torch.tensor(xs, dtype=torch.float32))


@FAST
@given(vectors, st.sampled_from([16, 8, 4, 2]), st.sampled_from([1, 7, 64, 1024]),
       st.sampled_from(["none", "zstd", "lz4"]))
def test_quantized_round_trip_is_within_one_step(x, bits, block, lossless):
    encoded = encode(x, CompressionConfig(bits=bits, block=block, lossless=lossless),
                     generator=np.random.default_rng(0))
    y = decode(encoded)
    assert y.shape == x.shape
    # Every entry lands on one of the two levels around it: within one step of its block.
    for start in range(0, x.numel(), block):
        part = x[start:start + block]
        step = float(part.max() - part.min()) / ((1 << bits) - 1)
        err = (y[start:start + block] - part).abs().max()
        assert float(err) <= step * (1 + 1e-4) + 1e-5 * float(part.abs().max())
    assert len(encoded.payload) <= raw_size(count=x.numel(), sparse=False, bits=bits,
                                            block=block) or lossless != "none"


@FAST
@given(st.lists(floats, min_size=2, max_size=40), st.sampled_from([8, 4, 2]))
def test_stochastic_rounding_is_unbiased(xs, bits):
    x = torch.tensor(xs, dtype=torch.float32)
    draws = 2000
    # One block per copy of x: every draw has x's own levels and fresh noise.
    config = CompressionConfig(bits=bits, block=len(xs))
    tiled = x.repeat(draws)
    decoded = decode(encode(tiled, config, generator=np.random.default_rng(1)))
    mean = decoded.view(draws, -1).double().mean(0)
    spread = max(float(x.max() - x.min()), 1e-6)
    step = spread / ((1 << bits) - 1)
    # Each draw is off by at most one step; the mean of 2000 by ~step/sqrt(2000)*... :
    # 6 standard deviations of a Bernoulli step (at most step/2 each).
    assert float((mean - x.double()).abs().max()) <= 6 * (step / 2) / math.sqrt(draws) + 1e-6 * spread


@FAST
@given(vectors, st.floats(min_value=0.01, max_value=1.0))
def test_top_k_keeps_the_largest_entries(x, fraction):
    y = decode(encode(x, CompressionConfig(top_k=fraction)))
    kept = y != 0
    k = min(x.numel(), max(1, math.ceil(fraction * x.numel())))
    assert int(kept.sum()) <= k
    assert torch.equal(y[kept], x[kept])  # values exact in float32
    if int(kept.sum()) < x.numel() and bool(kept.any()):
        assert float(x[~kept].abs().max()) <= float(x[kept].abs().min())


@FAST
@given(st.integers(min_value=1, max_value=5), st.sampled_from([None, 0.05, 0.3]),
       st.sampled_from([32, 8, 2]))
def test_error_feedback_accounts_for_every_residual(rounds, top_k, bits):
    config = CompressionConfig(top_k=top_k, bits=bits, error_feedback=True, block=32)
    generator = np.random.default_rng(2)
    torch.manual_seed(rounds)
    shapes = {"w": (17, 9), "b": (9,), "n": ()}
    residual = None
    total_in = {k: torch.zeros(s) for k, s in shapes.items()}
    total_out = {k: torch.zeros(s) for k, s in shapes.items()}
    for _ in range(rounds):
        update = {k: torch.randn(s) for k, s in shapes.items()}
        before = residual or {k: torch.zeros(s) for k, s in shapes.items()}
        out = compress_update(update, config, residual=residual, generator=generator)
        sent = decode_update(out.parts)
        for k in shapes:
            # sent + new residual == update + old residual, tensor by tensor
            torch.testing.assert_close(sent[k] + out.residual[k], update[k] + before[k])
            total_in[k] += update[k]
            total_out[k] += sent[k]
        residual = out.residual
    for k in shapes:  # over all rounds, what was not sent is exactly the residual
        torch.testing.assert_close(total_out[k] + residual[k], total_in[k], atol=1e-4, rtol=1e-4)


def test_compressed_update_is_smaller_and_falls_back_to_raw():
    update = {"w": torch.randn(100, 100), "b": torch.randn(3), "steps": torch.tensor(7)}
    out = compress_update(update, CompressionConfig(top_k=0.01, bits=8))
    assert out.sent_bytes < 0.02 * out.raw_bytes + 64
    assert isinstance(out.parts["b"], torch.Tensor)  # 3 floats: the encoding is no smaller
    assert out.parts["steps"] is update["steps"]  # not float32: raw
    assert out.residual is None


@pytest.mark.parametrize("lossless", ["zstd", "lz4"])
def test_lossless_alone_is_exact_and_smaller_on_compressible_data(lossless):
    x = torch.zeros(10_000)
    x[::10] = torch.randn(1000)
    encoded = encode(x, CompressionConfig(lossless=lossless))
    assert encoded.lossless == lossless and encoded.nbytes < x.numel() * 4 // 2
    assert torch.equal(decode(encoded), x)
    noise = torch.randn(1000)  # incompressible: kept unframed
    assert encode(noise, CompressionConfig(lossless=lossless)).lossless in ("none", lossless)


def _sparse():
    return encode(torch.arange(1.0, 101.0), CompressionConfig(top_k=0.1))


def _with_payload(encoded, mutate):
    raw = bytearray(encoded.payload)
    mutate(raw)
    return dataclasses.replace(encoded, payload=bytes(raw))


@pytest.mark.parametrize(("what", "make", "message"), [
    ("index out of range",
     lambda: _with_payload(_sparse(), lambda r: r.__setitem__(slice(36, 40),
                                                              np.int32(100).tobytes())),
     "out of range"),
    ("negative index",
     lambda: _with_payload(_sparse(), lambda r: r.__setitem__(slice(0, 4),
                                                              np.int32(-1).tobytes())),
     "out of range"),
    ("repeated index",
     lambda: _with_payload(_sparse(), lambda r: r.__setitem__(slice(4, 8), r[0:4])),
     "strictly increasing"),
    ("short payload",
     lambda: dataclasses.replace(_sparse(), payload=_sparse().payload[:-1]), "needs"),
    ("more entries than elements",
     lambda: dataclasses.replace(_sparse(), count=101), "sparse entries"),
    ("dense count mismatch",
     lambda: dataclasses.replace(encode(torch.ones(8), CompressionConfig(bits=8)), count=7),
     "dense encoding"),
    ("NaN scale",
     lambda: _with_payload(encode(torch.randn(8), CompressionConfig(bits=8)),
                           lambda r: r.__setitem__(slice(4, 8), np.float32("nan").tobytes())),
     "NaN"),
    ("NaN value",
     lambda: _with_payload(encode(torch.randn(8), CompressionConfig(top_k=0.5)),
                           lambda r: r.__setitem__(slice(16, 20), np.float32("inf").tobytes())),
     "NaN or Inf"),
    ("bad bits", lambda: dataclasses.replace(_sparse(), bits=3), "bits"),
    ("corrupt zstd",
     lambda: dataclasses.replace(encode(torch.zeros(1000), CompressionConfig(lossless="zstd")),
                                 payload=b"\x28\xb5\x2f\xfd" + b"\x00" * 20), "zstd|needs"),
    ("zstd bomb",
     lambda: dataclasses.replace(
         encode(torch.zeros(10), CompressionConfig(lossless="zstd")),
         payload=encode(torch.zeros(100_000), CompressionConfig(lossless="zstd")).payload),
     "zstd frame declares"),
    ("lz4 bomb",
     lambda: dataclasses.replace(
         encode(torch.zeros(16), CompressionConfig(lossless="lz4")),
         payload=encode(torch.zeros(100_000), CompressionConfig(lossless="lz4")).payload),
     "needs"),
    ("unknown lossless", lambda: dataclasses.replace(_sparse(), lossless="gzip"), "lossless"),
])
def test_malformed_encodings_are_refused(what, make, message):
    with pytest.raises(EncodingError, match=message):
        parse(make())


def test_decoded_update_decodes_on_read_and_checks_up_front():
    update = {"w": torch.randn(40, 5), "steps": torch.tensor(3)}
    out = compress_update(update, CompressionConfig(top_k=0.2, bits=8))
    view = DecodedUpdate(out.parts, {"w": (40, 5), "steps": ()})
    assert view.encoded == 1 and list(view) == ["w", "steps"]
    assert view["w"].shape == (40, 5) and view["w"].dtype == torch.float32
    assert int((view["w"] != 0).sum()) <= 40
    bad = dataclasses.replace(out.parts["w"], count=201)
    with pytest.raises(EncodingError, match="tensor 'w'"):
        DecodedUpdate({"w": bad}, {"w": (40, 5)})
    with pytest.raises(EncodingError, match="shape"):
        DecodedUpdate({"w": out.parts["w"]}, {"w": (5, 40)})


def test_config_refuses_nonsense():
    with pytest.raises(ValueError, match="top_k"):
        CompressionConfig(top_k=0.0)
    with pytest.raises(ValueError, match="bits"):
        CompressionConfig(bits=12)
    assert CompressionConfig(top_k=0.01, bits=8, lossless="zstd").describe() == "top1%+q8+zstd"


def test_adaptive_picks_the_finest_setting_that_meets_the_target():
    from fedkube.runtime.compression.adaptive import choose, estimated_bytes, ladder

    coarsest = CompressionConfig(top_k=0.01, bits=8, error_feedback=True)
    steps = ladder(coarsest)
    assert steps[0].describe() == "fp32" and steps[-1] == coarsest
    sizes = [100_000, 100]
    sent = [estimated_bytes(s, sizes) for s in steps]
    assert sent == sorted(sent, reverse=True) and len(set(sent)) == len(sent)
    assert sent[0] == 4 * sum(sizes)
    # Encoded for real, the estimate holds (before lossless framing).
    update = {"w": torch.randn(100_000), "b": torch.randn(100)}
    for step in steps:
        assert compress_update(update, step).sent_bytes <= estimated_bytes(step, sizes)
    fast = choose(coarsest, sizes=sizes, bytes_per_second=1e9, target_seconds=1)
    assert fast.describe() == "fp32" and fast.error_feedback
    # 10 kB/s for 5 s: 50 kB; q8 dense is 100 kB + scales, top-10% at q8 is 50 kB + scales.
    middle = choose(coarsest, sizes=sizes, bytes_per_second=10_000, target_seconds=5)
    assert middle.top_k == 0.05 and middle.bits == 8
    assert choose(coarsest, sizes=sizes, bytes_per_second=1, target_seconds=1) == coarsest
    assert choose(coarsest, sizes=sizes, bytes_per_second=0.0, target_seconds=1) == coarsest


@pytest.mark.parametrize("fraction", [0.3, 0.01, 1e-5])
def test_top_k_of_a_large_tensor_is_exact(fraction):
    from fedkube.runtime.compression.codec import top_k_indices

    torch.manual_seed(4)
    x = torch.randn(300_000)
    x[::7] = 0.5  # many ties around the threshold
    got = top_k_indices(x, fraction)
    k = max(1, math.ceil(fraction * x.numel()))
    assert got.numel() == k and bool((got[1:] > got[:-1]).all())
    expected = torch.topk(x.abs(), k).values
    torch.testing.assert_close(torch.sort(x.abs()[got]).values, torch.sort(expected).values)


@FAST
@given(vectors, st.sampled_from([None, 0.5, 0.05]), st.sampled_from([32, 16, 8, 4, 2]),
       st.sampled_from([1, 7, 1024]))
def test_the_sent_values_error_feedback_keeps_are_what_decode_returns(x, top_k, bits, block):
    from fedkube.runtime.compression.codec import encode_with_sent

    config = CompressionConfig(top_k=top_k, bits=bits, block=block)
    encoded, sent = encode_with_sent(x, config, generator=np.random.default_rng(3))
    assert sent is not None
    assert torch.equal(sent, decode(encoded))  # bit for bit, no second decode needed
    if bits == 32 and top_k is None:
        x[0] += 1.0  # the sent tensor is not a view of the caller's
        assert not torch.equal(sent, x)


@FAST
@given(vectors, st.sampled_from([None, 0.5, 0.05]), st.sampled_from([32, 16, 8, 2]),
       st.sampled_from([1, 7, 1024]))
def test_the_residual_error_feedback_keeps_is_what_was_not_sent(x, top_k, bits, block):
    from fedkube.runtime.compression.codec import encode_with_residual, encode_with_sent

    config = CompressionConfig(top_k=top_k, bits=bits, block=block)
    encoded, left = encode_with_residual(x, config, generator=np.random.default_rng(3))
    again, sent = encode_with_sent(x, config, generator=np.random.default_rng(3))
    assert encoded == again and sent is not None
    # Bit for bit the float32 subtraction, computed without a dense decode.
    assert torch.equal((x - sent).view(torch.int32), left.view(torch.int32))
