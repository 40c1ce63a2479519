"""Weight snapshots from the learner to the generators, behind one small interface.

A snapshot is ONE contiguous payload: the tensors of a state dict in name order, back to back, described
by a manifest of ``TensorEntry(name, dtype, shape, offset, nbytes)`` and checked by the payload's sha256.
dtypes are torch names (``"bfloat16"`` included: numpy has no bf16, so payloads stay raw bytes and
``unpack`` rebuilds torch tensors; ``torch_dtype`` and ``dtype_name`` convert).

Transports (``weights.transport``):
- ``redis``: the payload in keys ``lpo:{run}:w:{version}:{i}`` of at most ``weights.chunk_mb`` each.
- ``object_store``: the payload as one Ray object. The publisher owns it (one copy in the object store) and
  keeps the refs of the last ``keep_versions``; a small named actor (``WeightRegistry``) hands the refs
  to fetchers, because a ref's hex string cannot be turned back into a live ``ObjectRef``. Payloads live
  as long as the publishing process: a restarted learner republishes.

Either way, the payload is written completely before the ``WeightSnapshot`` is announced on the stream
``lpo:{run}:weights`` and stored under ``lpo:{run}:w:latest``: a generator never sees a half-written version.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch

from services.common.config import WeightsConfig
from services.common.messages import TensorEntry, WeightSnapshot, decode, encode
from services.common.queue import RedisConnection
from services.common.redis_server import Backoff

log = logging.getLogger(__name__)

TensorLike = torch.Tensor | np.ndarray
_ANNOUNCE_MAXLEN = 1000  # announcements kept on the weights stream (approximate trim)


class WeightTransportError(RuntimeError):
    """A snapshot that cannot be delivered."""


class WeightIntegrityError(WeightTransportError):
    """A fetched payload whose size or sha256 differs from its announcement."""


class SnapshotMissingError(WeightTransportError, LookupError):
    """A snapshot whose payload is gone (garbage-collected, publisher died) or was never completed."""


class WeightTransport(Protocol):
    """Moves weight snapshots from the learner to the generators."""

    def publish(self, version: int, state: Mapping[str, TensorLike]) -> WeightSnapshot:
        """Store the payload of ``state`` as ``version``, then announce it; returns the announcement."""
        ...

    def fetch(self, snapshot: WeightSnapshot) -> dict[str, torch.Tensor]:
        """The tensors of an announced snapshot, checksum verified."""
        ...

    def fetch_payload(self, snapshot: WeightSnapshot) -> bytes | bytearray | memoryview | np.ndarray:
        """The verified payload bytes of an announced snapshot (layout: ``snapshot.manifest``)."""
        ...

    def latest(self) -> WeightSnapshot | None:
        """The most recent announcement, None before the first publish."""
        ...

    def gc(self, keep: int | None = None) -> list[int]:
        """Delete payloads of all but the newest ``keep`` versions; returns the deleted versions."""
        ...


# ---- payload format ------------------------------------------------------------------------------------
def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a manifest / config dtype name (``"bfloat16"`` -> ``torch.bfloat16``)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise WeightIntegrityError(
            f"manifest dtype {name!r} is not a torch dtype (e.g. 'bfloat16', 'float32')"
        )
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The name a manifest records for ``dtype`` (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(dtype).removeprefix("torch.")


def _as_cpu_tensor(name: str, value: TensorLike) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        try:
            # Not np.ascontiguousarray: it turns a 0-d array into a 1-d one.
            value = torch.from_numpy(value if value.flags.c_contiguous else value.copy(order="C"))
        except TypeError as exc:
            raise TypeError(
                f"tensor {name!r}: numpy dtype {value.dtype} has no torch equivalent ({exc})"
            ) from None
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"tensor {name!r} is a {type(value).__name__}; a state dict holds torch or numpy tensors"
        )
    return value.detach().to("cpu").contiguous()


def pack(state: Mapping[str, TensorLike]) -> tuple[bytearray, tuple[TensorEntry, ...]]:
    """A state dict as one payload (tensors sorted by name, back to back) and its manifest."""
    tensors = [(name, _as_cpu_tensor(name, state[name])) for name in sorted(state)]
    manifest = []
    offset = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        manifest.append(TensorEntry(name, dtype_name(tensor.dtype), tuple(tensor.shape), offset, nbytes))
        offset += nbytes
    payload = bytearray(offset)
    view = memoryview(payload)
    for entry, (_, tensor) in zip(manifest, tensors, strict=True):
        if entry.nbytes:
            # Viewing as bytes works for every dtype, bfloat16 included (numpy cannot hold bf16).
            view[entry.offset : entry.offset + entry.nbytes] = tensor.reshape(-1).view(torch.uint8).numpy()
    return payload, tuple(manifest)


def unpack(
    payload: bytes | bytearray | memoryview | np.ndarray, manifest: tuple[TensorEntry, ...]
) -> dict[str, torch.Tensor]:
    """Tensors from a payload, each entry's size and bounds checked against its dtype, shape and the payload.
    A writable payload is shared (no copy); a read-only one is copied once."""
    buffer: Any = payload
    if memoryview(payload).readonly:
        buffer = bytearray(memoryview(payload).cast("B"))
    size = memoryview(buffer).nbytes
    out: dict[str, torch.Tensor] = {}
    for entry in manifest:
        dtype = torch_dtype(entry.dtype)
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = math.prod(entry.shape)
        if numel * itemsize != entry.nbytes or entry.offset + entry.nbytes > size:
            raise WeightIntegrityError(
                f"manifest entry {entry.name}: shape {entry.shape} x {entry.dtype} is {numel * itemsize} "
                f"bytes, entry says {entry.nbytes} at offset {entry.offset} of a {size}-byte payload"
            )
        if numel == 0:
            out[entry.name] = torch.empty(entry.shape, dtype=dtype)
        elif entry.offset % itemsize:
            # Misaligned (after an odd-sized tensor): copy into a fresh, aligned buffer.
            chunk = bytearray(memoryview(buffer)[entry.offset : entry.offset + entry.nbytes])
            out[entry.name] = torch.frombuffer(chunk, dtype=dtype).reshape(entry.shape)
        else:
            flat = torch.frombuffer(buffer, dtype=dtype, count=numel, offset=entry.offset)
            out[entry.name] = flat.reshape(entry.shape)
    return out


def sha256_hex(payload: bytes | bytearray | memoryview | np.ndarray) -> str:
    return hashlib.sha256(memoryview(payload).cast("B")).hexdigest()


def verify(snapshot: WeightSnapshot, payload: bytes | bytearray | memoryview | np.ndarray) -> None:
    """Raise ``WeightIntegrityError`` unless ``payload`` has the snapshot's size and sha256."""
    size = memoryview(payload).nbytes
    if size != snapshot.nbytes:
        raise WeightIntegrityError(
            f"snapshot v{snapshot.version}: fetched {size} bytes, announced {snapshot.nbytes}; "
            "the payload is truncated or was overwritten - fetch latest() again"
        )
    actual = sha256_hex(payload)
    if actual != snapshot.sha256:
        raise WeightIntegrityError(
            f"snapshot v{snapshot.version}: sha256 {actual} != announced {snapshot.sha256}; the payload "
            "was corrupted or overwritten by a republish - fetch latest() again"
        )


# ---- announcements (shared by both transports) ---------------------------------------------------------
class _Announcements:
    """``lpo:{run}:weights`` (a stream of encoded ``WeightSnapshot``) and ``lpo:{run}:w:latest``."""

    def __init__(self, conn: RedisConnection, run: str) -> None:
        self.stream = f"lpo:{run}:weights"
        self.latest_key = f"lpo:{run}:w:latest"
        self._conn = conn

    def announce(self, snapshot: WeightSnapshot) -> str:
        """Append to the stream and set latest in one transaction; returns the stream entry id."""
        body = encode(snapshot)
        fields = {b"m": body, b"version": str(snapshot.version).encode()}

        def commands(pipe: Any) -> None:
            pipe.xadd(self.stream, fields, maxlen=_ANNOUNCE_MAXLEN, approximate=True)
            pipe.set(self.latest_key, body)

        entry_id = self._conn.transaction(f"MULTI XADD {self.stream} SET {self.latest_key}", commands)[0]
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    def latest(self) -> WeightSnapshot | None:
        body = self._conn.call(f"GET {self.latest_key}", lambda: self._conn.client.get(self.latest_key))
        return None if body is None else decode(body, WeightSnapshot)


def _abandoned(stored: list[int], version: int) -> list[int]:
    """Stored versions above the one being published: the lineage a resumed learner abandoned, which
    must go (gc keeps the newest versions, and would keep those instead of the live one)."""
    newer = [v for v in stored if v > version]
    if newer:
        log.warning("publishing v%d: discarding snapshots %s of the abandoned lineage", version, newer)
    return newer


def _check_transport(snapshot: WeightSnapshot, name: str) -> None:
    if snapshot.transport != name:
        raise WeightTransportError(
            f"snapshot v{snapshot.version} was published with transport {snapshot.transport!r}, this is "
            f"{name!r}; set the same weights.transport for learner and generators"
        )


def _log_published(snapshot: WeightSnapshot, started: float, where: str) -> None:
    log.info(
        "published snapshot v%d: %d tensors, %.1f MB %s in %.2fs (sha256 %s)",
        snapshot.version,
        len(snapshot.manifest),
        snapshot.nbytes / 2**20,
        where,
        time.monotonic() - started,
        snapshot.sha256[:12],
    )


# ---- redis transport -----------------------------------------------------------------------------------
class RedisWeightTransport:
    """Payload chunks in Redis keys ``lpo:{run}:w:{version}:{i}``; ``lpo:{run}:w:index`` maps each stored
    version to its chunk count (written before the chunks, so gc also removes a half-written version)."""

    name = "redis"

    def __init__(
        self,
        redis_url: str,
        run: str,
        *,
        chunk_mb: float = 64.0,
        keep_versions: int = 3,
        backoff: Backoff | None = None,
    ) -> None:
        if chunk_mb <= 0 or keep_versions < 1:
            raise ValueError(f"chunk_mb={chunk_mb} must be > 0 and keep_versions={keep_versions} >= 1")
        self.run = run
        self.chunk_bytes = max(1, int(chunk_mb * 2**20))
        self.keep_versions = keep_versions
        self.index_key = f"lpo:{run}:w:index"
        self._conn = RedisConnection(redis_url, backoff=backoff)
        self._redis = self._conn.client
        self._ann = _Announcements(self._conn, run)

    def prefix(self, version: int) -> str:
        return f"lpo:{self.run}:w:{version}"

    def publish(self, version: int, state: Mapping[str, TensorLike]) -> WeightSnapshot:
        """Write all chunks, then announce; then gc down to ``keep_versions``."""
        started = time.monotonic()
        payload, manifest = pack(state)
        prefix = self.prefix(version)
        n_chunks = math.ceil(len(payload) / self.chunk_bytes)
        # A republished version must not keep stale extra chunks; versions above it were published by
        # the lineage a resumed learner abandoned, and gc must not keep them as "newest".
        self._delete_versions([version, *_abandoned(self.versions(), version)])
        self._conn.call(
            f"HSET {self.index_key}", lambda: self._redis.hset(self.index_key, str(version), n_chunks)
        )
        view = memoryview(payload)
        for i in range(n_chunks):
            chunk = view[i * self.chunk_bytes : (i + 1) * self.chunk_bytes]
            self._conn.call(
                f"SET {prefix}:{i}", lambda i=i, chunk=chunk: self._redis.set(f"{prefix}:{i}", chunk)
            )
        snapshot = WeightSnapshot(version, manifest, len(payload), sha256_hex(payload), self.name, prefix)
        self._ann.announce(snapshot)
        _log_published(snapshot, started, f"in {n_chunks} Redis chunks")
        self.gc()
        return snapshot

    def fetch(self, snapshot: WeightSnapshot) -> dict[str, torch.Tensor]:
        """Reassemble the chunks under ``snapshot.location``, verify, unpack."""
        return unpack(self.fetch_payload(snapshot), snapshot.manifest)

    def fetch_payload(self, snapshot: WeightSnapshot) -> bytearray:
        """The chunks under ``snapshot.location`` joined into one buffer, size and sha256 verified."""
        _check_transport(snapshot, self.name)
        version = str(snapshot.version)
        n_chunks = self._conn.call(
            f"HGET {self.index_key}", lambda: self._redis.hget(self.index_key, version)
        )
        if n_chunks is None:
            raise self._missing(snapshot)
        payload = bytearray(snapshot.nbytes)
        view = memoryview(payload)
        offset = 0
        for i in range(int(n_chunks)):
            key = f"{snapshot.location}:{i}"
            chunk = self._conn.call(f"GET {key}", lambda key=key: self._redis.get(key))
            if chunk is None:  # deleted while we read
                raise self._missing(snapshot)
            if offset + len(chunk) > snapshot.nbytes:
                raise WeightIntegrityError(
                    f"snapshot v{snapshot.version}: chunks hold more than the announced {snapshot.nbytes} "
                    "bytes (overwritten by a republish?) - fetch latest() again"
                )
            view[offset : offset + len(chunk)] = chunk
            offset += len(chunk)
        verify(snapshot, view[:offset])
        return payload

    def _missing(self, snapshot: WeightSnapshot) -> SnapshotMissingError:
        return SnapshotMissingError(
            f"snapshot v{snapshot.version}: payload under {snapshot.location} is gone - the version was "
            f"garbage-collected (weights.keep_versions={self.keep_versions}) or its publish did not finish; "
            "fetch latest()"
        )

    def latest(self) -> WeightSnapshot | None:
        return self._ann.latest()

    def versions(self) -> list[int]:
        """Versions whose payload is stored, oldest first."""
        index = self._conn.call(f"HKEYS {self.index_key}", lambda: self._redis.hkeys(self.index_key))
        return sorted(int(v) for v in index)

    def gc(self, keep: int | None = None) -> list[int]:
        keep = self.keep_versions if keep is None else keep
        if keep < 1:
            raise ValueError(f"gc keep={keep} must be >= 1 (the latest snapshot is always kept)")
        old = self.versions()[:-keep]
        self._delete_versions(old)
        if old:
            log.info("garbage-collected snapshots %s (keeping the newest %d)", old, keep)
        return old

    def _delete_versions(self, versions: list[int]) -> None:
        for version in versions:
            raw = self._conn.call(
                f"HGET {self.index_key}", lambda v=version: self._redis.hget(self.index_key, str(v))
            )
            if raw is None:
                continue
            keys = [f"{self.prefix(version)}:{i}" for i in range(int(raw))]
            for start in range(0, len(keys), 512):
                batch = keys[start : start + 512]
                self._conn.call(f"UNLINK {self.prefix(version)}:*", lambda b=batch: self._redis.unlink(*b))
            self._conn.call(
                f"HDEL {self.index_key}", lambda v=version: self._redis.hdel(self.index_key, str(v))
            )

    def close(self) -> None:
        self._conn.close()


# ---- Ray object store transport ------------------------------------------------------------------------
class WeightRegistry:
    """Version -> payload ObjectRef, run as a named Ray actor. Refs travel wrapped in a list so Ray passes
    the ref itself rather than resolving it to the payload."""

    def __init__(self) -> None:
        self._refs: dict[int, Any] = {}

    def register(self, version: int, boxed: list[Any]) -> None:
        self._refs[version] = boxed[0]

    def lookup(self, version: int) -> list[Any] | None:
        ref = self._refs.get(version)
        return None if ref is None else [ref]

    def versions(self) -> list[int]:
        return sorted(self._refs)

    def drop(self, versions: list[int]) -> None:
        for version in versions:
            self._refs.pop(version, None)


class ObjectStoreWeightTransport:
    """Payloads in the Ray object store, refs served by the named actor ``lpo-{run}-weights``.
    Needs ``ray.init`` (or to run inside a Ray worker)."""

    name = "object_store"

    def __init__(
        self,
        redis_url: str,
        run: str,
        *,
        keep_versions: int = 3,
        backoff: Backoff | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        if keep_versions < 1:
            raise ValueError(f"keep_versions={keep_versions} must be >= 1")
        self.run = run
        self.keep_versions = keep_versions
        self.actor_name = f"lpo-{run}-weights"
        self.timeout_s = timeout_s
        self._conn = RedisConnection(redis_url, backoff=backoff)
        self._ann = _Announcements(self._conn, run)
        self._refs: dict[int, Any] = {}  # the publisher's own refs keep its payloads alive
        self._registry: Any = None

    def _registry_actor(self, *, create: bool) -> Any:
        import ray

        if self._registry is None:
            if create:
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                # Pinned beside the publisher, which owns the payloads anyway: Ray spreads an actor that
                # needs no resources over random nodes, and a registry on a rollout node would die with it.
                here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
                actor_cls = ray.remote(num_cpus=0)(WeightRegistry)
                self._registry = actor_cls.options(
                    name=self.actor_name, get_if_exists=True, scheduling_strategy=here
                ).remote()
            else:
                try:
                    self._registry = ray.get_actor(self.actor_name)
                except ValueError:
                    raise SnapshotMissingError(
                        f"no weight registry actor {self.actor_name!r} in this Ray namespace: nothing was "
                        "published with the object_store transport in this run (or its publisher died)"
                    ) from None
        return self._registry

    def publish(self, version: int, state: Mapping[str, TensorLike]) -> WeightSnapshot:
        """``ray.put`` the payload, register its ref, then announce; then gc down to ``keep_versions``."""
        import ray

        started = time.monotonic()
        payload, manifest = pack(state)
        ref = ray.put(np.frombuffer(payload, dtype=np.uint8))
        registry = self._registry_actor(create=True)
        newer = _abandoned(ray.get(registry.versions.remote(), timeout=self.timeout_s), version)
        if newer:
            ray.get(registry.drop.remote(newer), timeout=self.timeout_s)
            for v in newer:
                self._refs.pop(v, None)
        ray.get(registry.register.remote(version, [ref]), timeout=self.timeout_s)
        self._refs[version] = ref
        snapshot = WeightSnapshot(version, manifest, len(payload), sha256_hex(payload), self.name, ref.hex())
        self._ann.announce(snapshot)
        _log_published(snapshot, started, "in the Ray object store")
        self.gc()
        return snapshot

    def fetch(self, snapshot: WeightSnapshot) -> dict[str, torch.Tensor]:
        """Ask the registry for the ref, ``ray.get`` it (zero-copy on the same node), verify, unpack."""
        return unpack(self.fetch_payload(snapshot), snapshot.manifest)

    def fetch_payload(self, snapshot: WeightSnapshot) -> np.ndarray:
        """The payload object (read-only, zero-copy on the same node), size and sha256 verified."""
        import ray

        _check_transport(snapshot, self.name)
        registry = self._registry_actor(create=False)
        boxed = ray.get(registry.lookup.remote(snapshot.version), timeout=self.timeout_s)
        if boxed is None or boxed[0].hex() != snapshot.location:
            raise SnapshotMissingError(
                f"snapshot v{snapshot.version} (object {snapshot.location}) is no longer registered: it was "
                f"garbage-collected (weights.keep_versions={self.keep_versions}) or republished; "
                "fetch latest()"
            )
        try:
            payload = ray.get(boxed[0], timeout=self.timeout_s)
        except ray.exceptions.ObjectLostError as exc:  # OwnerDiedError is a subclass
            raise SnapshotMissingError(
                f"snapshot v{snapshot.version}: payload lost ({exc}); fetch latest()"
            ) from exc
        verify(snapshot, payload)
        return payload

    def latest(self) -> WeightSnapshot | None:
        return self._ann.latest()

    def gc(self, keep: int | None = None) -> list[int]:
        import ray

        keep = self.keep_versions if keep is None else keep
        if keep < 1:
            raise ValueError(f"gc keep={keep} must be >= 1 (the latest snapshot is always kept)")
        registry = self._registry_actor(create=False)
        old = ray.get(registry.versions.remote(), timeout=self.timeout_s)[:-keep]
        if old:
            ray.get(registry.drop.remote(old), timeout=self.timeout_s)
            for version in old:
                self._refs.pop(version, None)
            log.info("released snapshots %s from the object store (keeping the newest %d)", old, keep)
        return old

    def close(self) -> None:
        self._conn.close()


def make_transport(cfg: WeightsConfig, redis_url: str, run: str) -> WeightTransport:
    """The transport named by ``weights.transport``."""
    if cfg.transport == "redis":
        return RedisWeightTransport(redis_url, run, chunk_mb=cfg.chunk_mb, keep_versions=cfg.keep_versions)
    if cfg.transport == "object_store":
        return ObjectStoreWeightTransport(redis_url, run, keep_versions=cfg.keep_versions)
    raise ValueError(f"weights.transport={cfg.transport!r}; valid: redis, object_store")
