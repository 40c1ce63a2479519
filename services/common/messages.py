"""Every record that crosses a process boundary: frozen, slotted, validated on construction.

Token-carrying records keep numpy arrays (read-only views) rather than Python lists: a group of
8 x 4096 tokens is 32k numbers and is encoded as one buffer, not 32k msgpack items.

Wire format (``encode`` / ``decode``): msgpack of ``{"schema": SCHEMA_VERSION, "type": name, "data": ...}``
with numpy arrays as ``{"__nd__": dtype, "shape": [...], "buf": bytes}``. A payload of another schema
version, a truncated payload or an unknown type raises ``MessageDecodeError`` saying which.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

SCHEMA_VERSION = 1
FINISH_REASONS = ("stop", "length", "abort")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class MessageDecodeError(ValueError):
    """A payload that cannot be decoded into a message."""


def _frozen_array(value: Any, dtype: np.dtype | type, name: str) -> np.ndarray:
    arr = np.array(value, dtype=dtype, copy=True)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    arr.flags.writeable = False
    return arr


def _freeze(value: Any) -> Any:
    """Lists become tuples so a record compares equal after a round trip through the wire."""
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return {k: _freeze(v) for k, v in value.items()}
    return value


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclasses normalise their own fields once


def task_seed(base: int, key: str) -> int:
    """A sampling seed for one task from a base seed and a key, independent of batching and of
    anything else (same base and key, same samples)."""
    digest = hashlib.blake2b(key.encode(), digest_size=4).digest()
    return (base * 1_000_003 + int.from_bytes(digest, "little")) % (2**31 - 1)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How a task's K responses are sampled. The task's sampling seed is ``task_seed(seed, seed_key)``
    (vLLM gives the K children that seed, +1, ...): ``seed`` defaults to the generator's seed and
    ``seed_key`` to the task id. The coordinator sets ``seed = generator.seed`` and ``seed_key`` to the
    task's position in the run's task stream, so a run's samples depend on its seed and config, never on
    its run name (which the task ids contain)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 48
    seed: int | None = None
    seed_key: str | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0 or not 0 < self.top_p <= 1 or self.max_tokens < 1:
            raise ValueError(
                f"sampling params out of range: temperature={self.temperature} (> 0), "
                f"top_p={self.top_p} (in (0, 1]), max_tokens={self.max_tokens} (>= 1)"
            )


@dataclass(frozen=True, slots=True, eq=False)
class RolloutTask:
    """One prompt to sample ``group_size`` responses for. ``reference`` is what the verifier rule of
    ``task_kind`` needs (for countdown: ``nums`` and ``target``). ``admit_version`` is the learner
    version at admission (staleness accounting)."""

    task_id: str
    prompt_token_ids: np.ndarray
    prompt_text: str
    task_kind: str
    reference: dict[str, Any]
    group_size: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    admit_version: int = 0

    def __post_init__(self) -> None:
        if not self.task_id:
            raise ValueError("task_id must be a non-empty string")
        _set(self, "prompt_token_ids", _frozen_array(self.prompt_token_ids, np.int32, "prompt_token_ids"))
        if self.prompt_token_ids.size == 0:
            raise ValueError(f"task {self.task_id}: prompt_token_ids is empty")
        # >= 1, not 2: an evaluation task may ask for one sample; training groups get K >= 2 from
        # coordinator.group_size, and the objectives refuse a group of one.
        if self.group_size < 1:
            raise ValueError(f"task {self.task_id}: group_size must be >= 1, got {self.group_size}")
        if self.admit_version < 0:
            raise ValueError(f"task {self.task_id}: admit_version must be >= 0, got {self.admit_version}")
        _set(self, "reference", {str(k): _freeze(v) for k, v in dict(self.reference).items()})

    def sampling_seed(self, default_seed: int) -> int:
        """The seed this task's K samples are drawn with (``default_seed``: the generator's own)."""
        base = default_seed if self.sampling.seed is None else self.sampling.seed
        return task_seed(base, self.task_id if self.sampling.seed_key is None else self.sampling.seed_key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RolloutTask) and _fields_equal(self, other)


@dataclass(frozen=True, slots=True, eq=False)
class Rollout:
    """One sampled response. ``token_ids`` and ``logprobs`` have equal length: ``logprobs[i]`` is the
    behaviour policy's log-prob of ``token_ids[i]`` as the engine reported it at sampling time."""

    token_ids: np.ndarray
    logprobs: np.ndarray
    finish_reason: str
    text: str = ""

    def __post_init__(self) -> None:
        _set(self, "token_ids", _frozen_array(self.token_ids, np.int32, "token_ids"))
        _set(self, "logprobs", _frozen_array(self.logprobs, np.float32, "logprobs"))
        if self.token_ids.shape != self.logprobs.shape:
            raise ValueError(
                f"token_ids ({self.token_ids.size}) and logprobs ({self.logprobs.size}) differ in length"
            )
        if self.logprobs.size and not (np.all(self.logprobs <= 1e-4) and np.all(np.isfinite(self.logprobs))):
            raise ValueError("logprobs must be finite and <= 0 (log-probabilities of the sampled tokens)")
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason {self.finish_reason!r} not in {FINISH_REASONS}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rollout) and _fields_equal(self, other)


@dataclass(frozen=True, slots=True, eq=False)
class ResponseGroup:
    """A prompt and its K responses, sampled by one policy version: the unit of the queue and of the
    loss. ``rollouts`` has ``task.group_size`` entries; ``rewards`` and ``verdicts`` are None until the
    verifier fills them and then align with ``rollouts``. The group id is the task id, so a task that is
    sampled twice after a crash is still trained at most once."""

    task: RolloutTask
    rollouts: tuple[Rollout, ...]
    behavior_version: int
    behavior_sha256: str
    generator_id: str = ""
    rewards: tuple[float, ...] | None = None
    verdicts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _set(self, "rollouts", tuple(self.rollouts))
        tid = self.task.task_id
        if len(self.rollouts) != self.task.group_size:
            raise ValueError(
                f"group {tid}: {len(self.rollouts)} rollouts, task asks for {self.task.group_size}"
            )
        if self.behavior_version < 0:
            raise ValueError(f"group {tid}: behavior_version must be >= 0, got {self.behavior_version}")
        if not _SHA256.match(self.behavior_sha256):
            raise ValueError(
                f"group {tid}: behavior_sha256 must be 64 lowercase hex chars, got {self.behavior_sha256!r}"
            )
        if (self.rewards is None) != (self.verdicts is None):
            raise ValueError(f"group {tid}: rewards and verdicts are set together (verifier output)")
        if self.rewards is not None:
            _set(self, "rewards", tuple(float(r) for r in self.rewards))
            _set(self, "verdicts", tuple(self.verdicts or ()))
            if len(self.rewards) != len(self.rollouts) or len(self.verdicts or ()) != len(self.rollouts):
                raise ValueError(f"group {tid}: rewards/verdicts must have one entry per rollout")
            if not all(math.isfinite(r) for r in self.rewards):
                raise ValueError(f"group {tid}: rewards must be finite, got {self.rewards}")

    @property
    def group_id(self) -> str:
        return self.task.task_id

    def with_rewards(self, rewards: tuple[float, ...], verdicts: tuple[str, ...]) -> ResponseGroup:
        """The same group, scored."""
        return dataclasses.replace(self, rewards=rewards, verdicts=verdicts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ResponseGroup) and _fields_equal(self, other)


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor inside a snapshot payload: ``nbytes`` bytes at ``offset``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def __post_init__(self) -> None:
        _set(self, "shape", tuple(int(s) for s in self.shape))
        if not self.name or self.offset < 0 or self.nbytes < 0 or any(s < 0 for s in self.shape):
            raise ValueError(
                f"bad tensor {self.name!r}: offset={self.offset} nbytes={self.nbytes} shape={self.shape}"
            )


@dataclass(frozen=True, slots=True)
class WeightSnapshot:
    """A published policy version. ``manifest`` entries tile ``[0, nbytes)`` in order without gaps;
    ``sha256`` is of the whole payload; ``location`` is transport-specific (a key prefix, an object ref)."""

    version: int
    manifest: tuple[TensorEntry, ...]
    nbytes: int
    sha256: str
    transport: str
    location: str

    def __post_init__(self) -> None:
        _set(self, "manifest", tuple(self.manifest))
        if self.version < 0:
            raise ValueError(f"snapshot version must be >= 0, got {self.version}")
        if not _SHA256.match(self.sha256):
            raise ValueError(
                f"snapshot v{self.version}: sha256 must be 64 lowercase hex chars, got {self.sha256!r}"
            )
        offset = 0
        for entry in self.manifest:
            if entry.offset != offset:
                raise ValueError(
                    f"snapshot v{self.version}: {entry.name} starts at {entry.offset}, expected {offset}"
                )
            offset += entry.nbytes
        if offset != self.nbytes:
            raise ValueError(
                f"snapshot v{self.version}: manifest covers {offset} bytes, nbytes says {self.nbytes}"
            )


@dataclass(frozen=True, slots=True)
class LearnerStepMetrics:
    """What one learner step reports: rank 0's reduction over every rank and update of the step.
    ``objective`` holds the configured objective's own figures (KL, clip fraction, ESS, drift, ...);
    ``update_norm`` is set only with ``learner.log_update_norm``. ``as_json`` is the flat form that
    ``metrics.jsonl`` holds."""

    loss: float = 0.0
    grad_norm: float = 0.0
    grad_clip_fraction: float = 0.0
    entropy: float = 0.0
    mismatch_mean: float = 0.0
    mismatch_max: float = 0.0
    abs_s_t_fresh: float = 0.0
    abs_s_t_stale: float = 0.0
    stale_groups: float = 0.0
    proximal_s: float = 0.0
    update_s: float = 0.0
    update_norm: float | None = None
    objective: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_flat(cls, flat: dict[str, float]) -> LearnerStepMetrics:
        """From the learner's flat reduction: named fields by name, everything else to ``objective``."""
        named = {f.name for f in dataclasses.fields(cls)} - {"objective"}
        return cls(
            **{k: float(v) for k, v in flat.items() if k in named},
            objective={k: float(v) for k, v in flat.items() if k not in named},
        )

    def as_json(self) -> dict[str, float]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "objective"}
        if self.update_norm is None:
            del out["update_norm"]
        return out | self.objective


_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        SamplingParams,
        RolloutTask,
        Rollout,
        ResponseGroup,
        TensorEntry,
        WeightSnapshot,
        LearnerStepMetrics,
    )
}


def _fields_equal(a: Any, b: Any) -> bool:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
                return False
            if x.dtype != y.dtype or not np.array_equal(x, y):
                return False
        elif x != y:
            return False
    return True


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
        out["__t__"] = type(value).__name__
        return out
    if isinstance(value, np.ndarray):
        return {"__nd__": value.dtype.str, "shape": list(value.shape), "buf": value.tobytes()}
    if isinstance(value, tuple | list):
        return [_to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


def _from_wire(value: Any) -> Any:
    if isinstance(value, dict):
        if "__nd__" in value:
            arr = np.frombuffer(value["buf"], dtype=np.dtype(value["__nd__"])).reshape(value["shape"])
            return arr
        if "__t__" in value:
            name = value["__t__"]
            cls = _TYPES.get(name)
            if cls is None:
                raise MessageDecodeError(f"unknown message type {name!r}; known: {', '.join(_TYPES)}")
            kwargs = {k: _from_wire(v) for k, v in value.items() if k != "__t__"}
            return cls(**kwargs)
        return {k: _from_wire(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_from_wire(v) for v in value)
    return value


def encode(message: Any) -> bytes:
    """A message as versioned msgpack bytes."""
    if type(message).__name__ not in _TYPES:
        raise TypeError(f"cannot encode {type(message).__name__}; messages are: {', '.join(_TYPES)}")
    return msgpack.packb({"schema": SCHEMA_VERSION, "data": _to_wire(message)}, use_bin_type=True)


def decode(payload: bytes, expected: type | None = None) -> Any:
    """Bytes from ``encode`` back to a message; ``expected`` checks its type."""
    try:
        envelope = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException, ValueError) as exc:
        raise MessageDecodeError(
            f"payload of {len(payload)} bytes is truncated or not msgpack: {exc}"
        ) from None
    if not isinstance(envelope, dict) or "schema" not in envelope or "data" not in envelope:
        raise MessageDecodeError("payload is not a message envelope (missing 'schema'/'data')")
    if envelope["schema"] != SCHEMA_VERSION:
        raise MessageDecodeError(
            f"message schema version {envelope['schema']} != this build's {SCHEMA_VERSION}; "
            "run producers and consumers from the same release (or drain the queue before upgrading)"
        )
    try:
        message = _from_wire(envelope["data"])
    except (TypeError, ValueError) as exc:
        if isinstance(exc, MessageDecodeError):
            raise
        raise MessageDecodeError(f"payload does not form a valid message: {exc}") from None
    if expected is not None and not isinstance(message, expected):
        raise MessageDecodeError(f"expected a {expected.__name__}, got a {type(message).__name__}")
    return message
