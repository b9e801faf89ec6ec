"""coordinator/downlink and wire/downlink without a network: which version a delta is
sent from, how many versions are kept, that each delta is built once per version, and
that the agent's assembler rebuilds the model bit for bit or refuses what does not fit."""

from __future__ import annotations

import asyncio

import pytest
import torch
from fedkube.runtime import wire
from fedkube.runtime.coordinator.downlink import ModelDownlink, VersionStore, delta_base
from fedkube.runtime.plan import plan_for
from fedkube.runtime.proto import fedkube_pb2 as pb
from fedkube.runtime.spec import ManifestError, parse_job
from fedkube.runtime.wire import convert

Weights = dict[str, torch.Tensor]


def _versions(count: int) -> list[Weights]:
    torch.manual_seed(0)
    first = {"w": torch.randn(64, 32), "b": torch.randn(32), "steps": torch.tensor(0)}
    out = [first]
    for _ in range(count - 1):
        last = out[-1]
        out.append({"w": last["w"] + 1e-3 * torch.randn(64, 32), "b": last["b"],
                    "steps": last["steps"] + 1})
    return out


def _assemble(download, schema, held=None, held_version=None) -> Weights:
    assembler = wire.ModelAssembler(schema, held=held, held_version=held_version)
    for chunk in download.chunks:
        assembler.add(pb.TensorChunk.FromString(chunk))
    return assembler.finish()


def _bitwise_equal(a: Weights, b: Weights) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8) if a[k].dim() else a[k],
                                                 b[k].view(torch.uint8) if b[k].dim() else b[k])
        for k in a)


def test_delta_base_picks_a_stored_version_the_client_holds():
    assert delta_base(None, 3, [1, 2, 3]) is None  # holds nothing: whole model
    assert delta_base(2, 3, [1, 2, 3]) == 2
    assert delta_base(0, 3, [1, 2, 3]) is None  # no longer stored
    assert delta_base(4, 3, [1, 2, 3, 4]) is None  # newer than current: nonsense
    assert delta_base(3, 3, [3]) == 3  # holds the current one: an (empty) delta


def test_the_store_keeps_only_the_latest_versions():
    store = VersionStore(keep=2)
    for version, weights in enumerate(_versions(5)):
        store.add(version, weights)
    assert store.versions() == [2, 3, 4]
    assert store.get(1) is None and store.get(4) is not None
    with pytest.raises(ValueError, match="keep"):
        VersionStore(keep=-1)


def test_downloads_are_exact_deltas_built_once_per_version():
    versions = _versions(4)
    schema = wire.schema_of(versions[0])
    whole_bytes = wire.encoded_size(versions[0])
    downlink = ModelDownlink(deltas=True, keep=2)

    async def scenario():
        first = await downlink.download(0, versions[0], held=None)
        assert first.base is None and first.nbytes == whole_bytes
        held = _assemble(first, schema)
        for version in range(1, 4):
            answers = await asyncio.gather(*(downlink.download(version, versions[version],
                                                               held=version - 1)
                                             for _ in range(3)))
            assert all(a is answers[0] for a in answers)  # built once, shared
            delta = answers[0]
            assert delta.base == version - 1 and delta.nbytes < 0.9 * whole_bytes
            got = _assemble(delta, schema, held=held, held_version=version - 1)
            assert _bitwise_equal(got, versions[version])
            held = got
        # Version 0 is gone (keep 2): the whole model, as for a restarted coordinator.
        stale = await downlink.download(3, versions[3], held=0)
        assert stale.base is None and stale.nbytes == whole_bytes
        assert _bitwise_equal(_assemble(stale, schema), versions[3])

    asyncio.run(scenario())


def test_without_deltas_the_whole_model_goes_whatever_is_held():
    versions = _versions(2)
    downlink = ModelDownlink(deltas=False)

    async def scenario():
        await downlink.download(0, versions[0])
        return await downlink.download(1, versions[1], held=0)

    answer = asyncio.run(scenario())
    assert answer.base is None and downlink.store.versions() == [1]


def test_the_assembler_refuses_a_delta_that_does_not_fit():
    versions = _versions(2)
    schema = wire.schema_of(versions[0])
    downlink = ModelDownlink(deltas=True)

    async def scenario():
        await downlink.download(0, versions[0])
        return await downlink.download(1, versions[1], held=0)

    delta = asyncio.run(scenario())
    messages = [pb.TensorChunk.FromString(c) for c in delta.chunks]
    spoiled = next(m for m in messages if m.HasField("delta"))
    data = bytearray(spoiled.data)
    data[len(data) // 2] ^= 0xFF
    spoiled.data = bytes(data)
    with pytest.raises(wire.WireError, match="corrupt|checksum|bytes"):
        assembler = wire.ModelAssembler(schema, held=versions[0], held_version=0)
        for message in messages:
            assembler.add(message)
        assembler.finish()
    # The same delta, but the agent holds another version (or none): refused by name.
    with pytest.raises(wire.WireError, match="holds version 5"):
        wire.ModelAssembler(schema, held=versions[0], held_version=5).add(messages[0])
    with pytest.raises(wire.WireError, match="holds none"):
        wire.ModelAssembler(schema).add(messages[0])
    # Applied to a model that is not the version named: the checksum refuses it.
    other = {k: v + 1 for k, v in versions[0].items()}
    good = [pb.TensorChunk.FromString(c) for c in delta.chunks]
    assembler = wire.ModelAssembler(schema, held=other, held_version=0)
    for message in good:
        assembler.add(message)
    with pytest.raises(wire.WireError, match="checksum"):
        assembler.finish()


def _spec(**compression):
    return parse_job({"apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
                      "metadata": {"name": "d"},
                      "spec": {"model": "mlp", "data": {"dataset": "digits"},
                               "compression": compression}}).spec


def test_the_spec_field_reaches_the_agent_and_refuses_nonsense_by_name():
    assert _spec().compression.downlink == "none"
    spec = _spec(downlink="delta")
    plan = convert.plan_from_pb(convert.plan_to_pb(plan_for(
        spec, round=1, model_version=0, now=0.0, client_parameters={})))
    assert plan.compression.downlink == "delta"
    # The delta is framed even when uploads are not (an unframed XOR is model-sized).
    assert spec.compression.downlink_lossless == "zstd"
    assert _spec(downlink="delta", lossless="lz4").compression.downlink_lossless == "lz4"
    with pytest.raises(ManifestError, match="spec.compression.downlink"):
        _spec(downlink="xor")
