"""runtime/compression/downlink: the model as an exact delta from the version a client
holds reproduces the new version bit for bit, is much smaller than the model when the
versions are close, and is refused when it does not fit the model it is applied to."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fedkube.runtime.compression import EncodingError
from fedkube.runtime.compression.downlink import (
    apply_delta,
    apply_model_delta,
    delta_of,
    model_delta,
)
from fedkube.runtime.models import build_model
from hypothesis import given, settings
from hypothesis import strategies as st

floats = st.floats(width=32, allow_nan=True, allow_infinity=True)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(floats, floats), min_size=0, max_size=200),
       st.sampled_from(["none", "zstd", "lz4"]))
def test_delta_reproduces_the_new_version_bit_for_bit(pairs, lossless):
    old = torch.tensor([a for a, _ in pairs], dtype=torch.float32)
    new = torch.tensor([b for _, b in pairs], dtype=torch.float32)
    got = apply_delta(old, delta_of(old, new, lossless=lossless))
    # Bit patterns, so NaN payloads and -0.0 count too.
    assert torch.equal(got.view(torch.int32), new.view(torch.int32))


def test_a_model_delta_is_exact_small_and_leaves_the_old_model_alone():
    model = build_model("cnn28", input_shape=(1, 28, 28), num_classes=10, seed=0)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    # One small SGD-like step: every float entry changes a little; counters move by one.
    new = {k: v + 1e-3 * v.abs().mean() * torch.randn_like(v) if v.is_floating_point()
           else v + 1 for k, v in old.items()}
    snapshot = {k: v.clone() for k, v in old.items()}
    delta = model_delta(old, new, lossless="zstd")
    got = apply_model_delta(old, delta)
    for k, tensor in new.items():
        assert got[k].dtype == tensor.dtype and torch.equal(got[k], tensor)
        assert torch.equal(old[k], snapshot[k])
    raw = sum(v.numel() * v.element_size() for v in new.values())
    sent = sum(d.nbytes for d in delta.values())
    assert sent < 0.8 * raw  # the high bytes of close versions agree
    unchanged = model_delta(old, old, lossless="lz4")
    assert sum(d.nbytes for d in unchanged.values()) < 0.05 * raw


def test_a_delta_that_does_not_fit_is_refused():
    old, new = torch.zeros(10), torch.ones(10)
    delta = delta_of(old, new, lossless="zstd")
    with pytest.raises(EncodingError, match="applied to"):
        apply_delta(torch.zeros(11), delta)
    with pytest.raises(EncodingError, match="applied to"):
        apply_delta(torch.zeros(10, dtype=torch.float64), delta)
    with pytest.raises(EncodingError, match="zstd frame"):
        apply_delta(old, dataclasses.replace(delta, payload=b"not a frame"))
    short = dataclasses.replace(delta_of(old, new, lossless="none"), payload=b"\0" * 39)
    with pytest.raises(EncodingError, match="holds 39 bytes"):
        apply_delta(old, short)
    with pytest.raises(EncodingError, match="other tensors"):
        apply_model_delta({"a": old}, {"b": delta})
    with pytest.raises(ValueError, match="must match"):
        delta_of(old, torch.ones(3))


def test_a_delta_leads_only_to_the_version_it_was_made_for():
    old, new = torch.zeros(16), torch.arange(16, dtype=torch.float32)
    delta = delta_of(old, new, lossless="none")
    flipped = bytearray(delta.payload)
    flipped[5] ^= 0x40  # one bit on the way: the frame still has the right size
    with pytest.raises(EncodingError, match="checksum"):
        apply_delta(old, dataclasses.replace(delta, payload=bytes(flipped)))
    with pytest.raises(EncodingError, match="checksum"):  # right shape, other base
        apply_delta(torch.ones(16), delta)
