"""The verifier's queue worker scores groups into :groups and dead-letters what it cannot score."""

from __future__ import annotations

import hashlib

from services.common.messages import ResponseGroup, Rollout, RolloutTask
from services.common.queue import StreamQueue
from services.verifier.worker import VerifierWorker

SHA = hashlib.sha256(b"v0").hexdigest()


def _group(task_id: str, kind: str, texts: list[str]) -> ResponseGroup:
    task = RolloutTask(
        task_id, [1, 2], "Use 2 3 4 to make 20.\n", kind, {"nums": [2, 3, 4], "target": 20}, len(texts)
    )
    rollouts = tuple(Rollout([5], [-0.1], "stop", text=t) for t in texts)
    return ResponseGroup(task, rollouts, 0, SHA)


def test_worker_scores_and_rejects(redis_server) -> None:
    queue = StreamQueue(redis_server.url, "vw", block_ms=200)
    queue.ensure_groups()
    # (2+3)*4 = 20 -> 1.0;  2*3+4 = 10 -> 0.1 (well-formed);  no tags -> 0.0
    queue.put(
        "rollouts", _group("ok", "countdown", ["<answer>(2+3)*4</answer>", "<answer>2*3+4</answer>", "20"])
    )
    queue.put("rollouts", _group("bad", "chess", ["e4", "d4"]))
    worker = VerifierWorker(queue, consumer="v0")
    assert worker.step(block_ms=200) == 1
    (entry,) = queue.read("groups", "learner", count=10, block_ms=0)
    assert entry.message.group_id == "ok"
    assert entry.message.rewards == (1.0, 0.1, 0.0)
    assert entry.message.verdicts == ("pass", "fail", "parse_error")
    assert queue.pending_count("rollouts") == 0  # both inputs acknowledged
    dead = queue._redis.xrange(queue.key("dead"))
    assert len(dead) == 1 and b"unknown task kind 'chess'" in dead[0][1][b"reason"]
    assert worker.stats.rejected == 1 and worker.stats.passed == 1
