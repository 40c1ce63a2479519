"""Resume: continue a run directory's run from its newest checkpoint, and replay the steps trained since.

State a resume restores: the learner (DeepSpeed checkpoint: weights, optimizer, RNG, version), the
snapshot history and drop statistics (``checkpoint.json``), the dataset cursor, drop counts and trained
tasks (the ledger in Redis), and the steps trained since the checkpoint (the ledger's step records), which
are replayed with exactly the same groups before new ones are collected.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from services.common.ledger import RunLedger
from services.common.queue import QueueEntry, StreamQueue
from services.coordinator.collect import StepBatch
from services.coordinator.intake import GroupIntake
from services.coordinator.rundir import RunDir
from services.coordinator.tasks import TaskSource

logger = logging.getLogger(__name__)


class RunStateError(RuntimeError):
    """The queue's state does not fit what was asked (a fresh run over an old run's keys, a broken resume)."""


@dataclass
class Resumed:
    """Where the resumed run stands: the last checkpointed step and version, the loop time so far, the steps
    to replay (step -> (the version it was trained at, its groups' entries)) and every ``(version,
    sha256)`` the killed run published."""

    step: int = 0
    version: int = 0
    loop_seconds: float = 0.0
    replay: dict[int, tuple[int, list[QueueEntry]]] = field(default_factory=dict)
    published_before: set[tuple[int, str]] = field(default_factory=set)


def restore(
    run: str, rundir: RunDir, learner: Any, ledger: RunLedger, queue: StreamQueue, intake: GroupIntake,
    tasks: TaskSource,
) -> Resumed:  # fmt: skip
    """Load the newest checkpoint (or keep the base model if none was written) into ``learner``, restore
    ``intake`` and ``tasks`` from it and from the ledger, and read the steps to replay."""
    out = Resumed()
    ckpt = rundir.read_checkpoint()
    if ckpt is not None:
        version = learner.load_checkpoint(str(rundir.learner_checkpoints), ckpt["tag"])
        if version != ckpt["version"]:
            raise RunStateError(
                f"checkpoint {ckpt['tag']} holds v{version}, checkpoint.json says v{ckpt['version']}"
            )
        state = ckpt["coordinator"]
        out.step, out.version, out.loop_seconds = ckpt["step"], version, state["loop_seconds"]
        intake.history = {int(v): sha for v, sha in state["history"].items()}
        intake.drops.length_hist.update({int(k): n for k, n in state["dropped_length_hist"].items()})
        intake.drops.reward_hist.update({float(k): n for k, n in state["dropped_reward_hist"].items()})
    report = ledger.report()
    intake.drops.by_reason.update(report.dropped_by_reason)
    out.published_before = ledger.publications()
    intake.earlier = {p for p in out.published_before if intake.history.get(p[0]) != p[1]}
    tasks.position = ledger.cursor()
    for step, version, ids in ledger.steps_after(out.step):
        out.replay[step] = (version, queue.fetch("groups", ids))
    replayed = {e.message.group_id for _, entries in out.replay.values() for e in entries}
    intake.trained = ledger.trained_tasks() - replayed
    rundir.truncate_after(out.step)
    rundir.log_resume({
        "from_step": out.step,
        "replayed_steps": sorted(out.replay),
        "cursor": tasks.position,
        "ledger": report.as_dict(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })  # fmt: skip
    logger.warning(
        "resuming %s from step %d (v%d): replaying steps %s, then continuing at task %d",
        run, out.step, out.version, sorted(out.replay) or "none", tasks.position,
    )  # fmt: skip
    return out


def replayed_batch(
    step: int, recorded_version: int, entries: list[QueueEntry], intake: GroupIntake, version: int
) -> StepBatch:
    """A step trained before the run was killed and lost with the learner: the same groups, in the same
    order, checked on receipt like any others (against the published snapshots)."""
    if recorded_version != version + 1:
        raise RunStateError(
            f"step {step} was recorded at v{recorded_version}; the resumed learner is at v{version}"
        )
    for e in entries:
        reason = intake.reason_to_drop(e.message, version)
        if reason is not None:
            raise RunStateError(
                f"replaying step {step}: group {e.message.group_id} would be dropped ({reason}); the run "
                "directory's checkpoint and the Redis state do not belong together"
            )
    return StepBatch.of(entries, version, replayed=True)
