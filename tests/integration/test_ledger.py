"""The run ledger against a real redis-server: every admitted task ends trained, dropped, dead-lettered,
in flight or lost, computed from Redis (the ledger hash, the trained counts, the streams' unacked entries
and the dead-letter stream); admission and settlement are atomic with their stream writes."""

from __future__ import annotations

import hashlib

from services.common.ledger import RunLedger, both
from services.common.messages import ResponseGroup, Rollout, RolloutTask
from services.common.queue import StreamQueue
from services.common.redis_server import EmbeddedRedis

SHA = hashlib.sha256(b"v0").hexdigest()


def _task(i: int) -> RolloutTask:
    return RolloutTask(
        task_id=f"t{i}", prompt_token_ids=[1, 2], prompt_text="p", task_kind="countdown",
        reference={"nums": [1, 2], "target": 3}, group_size=2,
    )  # fmt: skip


def _group(task: RolloutTask) -> ResponseGroup:
    rollouts = tuple(Rollout([7, 8], [-0.5, -1.0], "stop") for _ in range(task.group_size))
    return ResponseGroup(task=task, rollouts=rollouts, behavior_version=0, behavior_sha256=SHA)


def test_every_task_is_accounted_for(redis_server: EmbeddedRedis) -> None:
    q = StreamQueue(redis_server.url, "ledger")
    q.ensure_groups()
    ledger = RunLedger(q)
    tasks = [_task(i) for i in range(5)]
    q.put_many("tasks", tasks, also=ledger.admitting([t.task_id for t in tasks]))
    assert ledger.states() == dict.fromkeys(["t0", "t1", "t2", "t3", "t4"], "admitted")

    # t0..t3 are sampled and scored; t4 stays in :tasks (in flight).
    entries = q.read("tasks", "gen", count=4, block_ms=0)
    q.forward("tasks", [e.entry_id for e in entries], "rollouts", [_group(e.message) for e in entries])
    scored = q.read("rollouts", "ver", count=4, block_ms=0)
    q.forward("rollouts", [e.entry_id for e in scored[:3]], "groups", [e.message for e in scored[:3]])
    q.reject("rollouts", scored[3], "scoring failed: test")  # t3 -> :dead
    groups = q.read("groups", "learner", count=3, block_ms=0)
    assert ledger.settled(["t0", "t1"]) == [False, False]
    q.ack("groups", [groups[0].entry_id], also=ledger.settling(trained=["t0"], version=1))
    q.ack("groups", [groups[1].entry_id], also=ledger.settling({"t1": "stale"}))
    # t2's group is read by the learner and not acked yet (in its buffer): in flight.
    assert ledger.settled(["t0", "t1", "t2"]) == [True, True, False]  # trained, dropped, in flight

    report = ledger.report()
    assert report.as_dict() == {
        "admitted": 5, "trained": 1, "dropped": 1, "dropped_by_reason": {"stale": 1},
        "in_flight": 2, "dead_lettered": 1, "lost": 0, "duplicates": 0,
    }  # fmt: skip

    # A transaction re-sent after a lost reply records the same training: not a duplicate.
    q.ack("groups", [groups[0].entry_id], also=ledger.settling(trained=["t0"], version=1))
    assert ledger.report().duplicates == 0
    # A stage that acks t2 without writing its outcome loses it; training t0 again is a duplicate.
    q.ack("groups", [groups[2].entry_id])
    q.ack("groups", [groups[0].entry_id], also=ledger.settling(trained=["t0"], version=2))
    report = ledger.report()
    assert (report.lost, report.duplicates, report.in_flight) == (1, 1, 1)


def test_resume_state_is_written_with_the_stream_writes(redis_server: EmbeddedRedis) -> None:
    """The cursor moves with the admission, a step's record with its acknowledgement; a resumed run reads
    them back, along with every snapshot ever published."""
    q = StreamQueue(redis_server.url, "resume-state")
    q.ensure_groups()
    ledger = RunLedger(q)
    assert not ledger.exists() and ledger.cursor() == 0 and ledger.steps_after(0) == []
    tasks = [_task(i) for i in range(4)]
    q.put_many("tasks", tasks, also=ledger.admitting([t.task_id for t in tasks], cursor=4))
    assert ledger.exists() and ledger.cursor() == 4
    ids = q.put_many("groups", [_group(t) for t in tasks])
    q.read("groups", "learner", count=4, block_ms=0)
    for step, pair in ((1, ids[:2]), (2, ids[2:])):
        q.ack("groups", pair, also=both(
            ledger.settling(trained=[f"t{2 * step - 2}", f"t{2 * step - 1}"], version=step),
            ledger.stepping(step, step, pair),
        ))  # fmt: skip
    assert ledger.steps_after(0) == [(1, 1, ids[:2]), (2, 2, ids[2:])]
    assert ledger.forget_steps_through(1) == 1 and ledger.steps_after(0) == [(2, 2, ids[2:])]
    assert ledger.trained_tasks() == {"t0", "t1", "t2", "t3"}
    ledger.record_publication(0, SHA)
    ledger.record_publication(1, "a" * 64)
    ledger.record_publication(1, "b" * 64)  # the same version republished by a resumed learner
    assert ledger.publications() == {(0, SHA), (1, "a" * 64), (1, "b" * 64)}
