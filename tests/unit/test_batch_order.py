"""The learner batch's order is the groups' admission order (within a behaviour version), whatever order
the verifier workers delivered them in: the same seeds then train on identically ordered batches."""

from __future__ import annotations

import random

from services.common.messages import ResponseGroup, Rollout, RolloutTask
from services.common.queue import QueueEntry
from services.coordinator.collect import batch_order
from services.coordinator.tasks import admission_index, task_id


def _entry(tid: str, version: int, arrival: int) -> QueueEntry:
    task = RolloutTask(tid, [1], "p", "countdown", {"nums": [1, 2], "target": 3}, 2)
    rollouts = tuple(Rollout([5], [-0.1], "stop") for _ in range(2))
    return QueueEntry(f"1000-{arrival}", ResponseGroup(task, rollouts, version, "0" * 64))


def test_task_ids_round_trip_their_admission_index() -> None:
    assert admission_index(task_id("countdown-tiny", 12)) == 12
    assert admission_index(task_id("a-t3-run", 0)) == 0  # the run name may itself hold "-t"
    assert admission_index("eval-0-17") is None and admission_index("t5") is None


def test_batch_order_ignores_arrival_order() -> None:
    groups = [(task_id("run", i), 0 if i < 6 else 1) for i in range(10)]
    orders = set()
    for seed in range(5):
        arrival = list(range(len(groups)))
        random.Random(seed).shuffle(arrival)
        entries = [_entry(tid, v, a) for (tid, v), a in zip(groups, arrival, strict=True)]
        entries.sort(key=batch_order)
        orders.add(tuple(e.message.task.task_id for e in entries))
    assert orders == {tuple(tid for tid, _ in groups)}  # version 0 first, then by admission index


def test_foreign_ids_sort_after_the_coordinators_by_arrival() -> None:
    entries = [_entry("other-b", 0, 1), _entry(task_id("run", 3), 0, 2), _entry("other-a", 0, 0)]
    entries.sort(key=batch_order)
    assert [e.message.task.task_id for e in entries] == ["run-t3", "other-a", "other-b"]
