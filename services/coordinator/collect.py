"""Collection: scored groups from ``:groups`` into the next learner batch, each checked on receipt.

A group is buffered only on its first delivery (the ledger, in Redis, says whether its task is settled, so
a restarted coordinator cannot train a group twice) and only while the intake admits it at the current
version; the batch takes the oldest behaviour versions first. A dropped group frees its task's slot, and
the admission callback queues a replacement at once so the step still fills.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from services.common.ledger import RunLedger
from services.common.messages import ResponseGroup
from services.common.queue import QueueEntry, StreamQueue, entry_order
from services.coordinator.admission import policy_lag
from services.coordinator.intake import GroupIntake
from services.coordinator.tasks import admission_index
from services.coordinator.watchdog import Watchdog

logger = logging.getLogger(__name__)


def batch_order(entry: QueueEntry) -> tuple[int, int, tuple[int, int]]:
    """Oldest behaviour version first, then admission order. Not arrival order: with several verifier
    workers the groups of one generator batch reach ``:groups`` in whichever order they finish scoring,
    and a batch in a different order sums its gradient in a different order, so runs with the same seeds
    would drift apart. Ids the coordinator did not make sort after its own, by arrival."""
    index = admission_index(entry.message.task.task_id)
    return entry.message.behavior_version, index if index is not None else 2**62, entry_order(entry.entry_id)


@dataclass(frozen=True)
class StepBatch:
    """The groups of one learner step, their ``:groups`` entry ids (acked once the step is published) and
    their policy lags at the learner version they are trained at."""

    groups: list[ResponseGroup]
    entry_ids: list[str]
    lags: list[int]
    replayed: bool = False  # a step of a resumed run, trained again with the groups recorded for it

    @classmethod
    def of(cls, entries: list[QueueEntry], version: int, *, replayed: bool = False) -> StepBatch:
        groups = [e.message for e in entries]
        lags = [policy_lag(version, g.behavior_version) for g in groups]
        return cls(groups, [e.entry_id for e in entries], lags, replayed)


class Collector:
    """Reads ``:groups`` as the learner's consumer and keeps the admissible ones, oldest first."""

    def __init__(
        self,
        queue: StreamQueue,
        ledger: RunLedger,
        intake: GroupIntake,
        watchdog: Watchdog,
        want: int,
        admit: Callable[[], int],
    ) -> None:
        self.queue, self.ledger, self.intake, self.watchdog = queue, ledger, intake, watchdog
        self.want, self.admit = want, admit
        self.buffer: list[QueueEntry] = []  # read, admissible, not yet trained (oldest first)
        self.version = 0

    def collect(self, version: int) -> StepBatch:
        """The next ``want`` admissible scored groups at learner ``version``, oldest behaviour first."""
        self.version = version
        drops = self.intake.drops.total
        self.buffer = [e for e in self.buffer if not self._dropped(e)]  # the version moved: re-check
        self._admit_if_freed(drops)
        self._take(self._lost_reads())
        self.watchdog.progress()
        while len(self.buffer) < self.want:
            fresh = self.queue.read("groups", "learner", count=max(self.want, 64)) or self._lost_reads()
            if fresh:
                self.watchdog.progress()
            else:
                self.watchdog.check(len(self.buffer), self.want)  # raises RunStalled naming the stuck stage
            self._take(fresh)
        self.buffer.sort(key=batch_order)
        take, self.buffer = self.buffer[: self.want], self.buffer[self.want :]
        return StepBatch.of(take, version)

    def _take(self, entries: list[QueueEntry]) -> None:
        """Buffer the admissible first deliveries; a drop frees its task's slot, so admit a replacement
        now (the step still gets ``want`` groups)."""
        drops = self.intake.drops.total
        for entry in self._first_deliveries(entries):
            if not self._dropped(entry):
                self.buffer.append(entry)
        self._admit_if_freed(drops)

    def _admit_if_freed(self, drops_before: int) -> None:
        if self.intake.drops.total != drops_before:
            self.admit()  # admits only what the lag bound allows: replacements for the freed slots

    def _lost_reads(self) -> list[QueueEntry]:
        """Groups delivered to the learner but neither buffered nor acknowledged: a read whose reply was
        lost (Redis restarted under it) and was retried. Checked only when the pending count says so."""
        if self.queue.pending_count("groups") <= len(self.buffer):
            return []
        held = {e.entry_id for e in self.buffer}
        lost = [e for e in self.queue.read_own_pending("groups", "learner") if e.entry_id not in held]
        if lost:
            logger.warning("recovered %d groups delivered to the learner but never received", len(lost))
        return lost

    def _first_deliveries(self, entries: list[QueueEntry]) -> list[QueueEntry]:
        """Entries whose task the ledger has not settled (trained or dropped) and the buffer does not hold;
        the others are second deliveries, dropped as duplicates. Checked against Redis, not memory, so a
        restarted coordinator cannot train a group twice."""
        seen = {e.message.group_id for e in self.buffer}
        kept = []
        settled = self.ledger.settled([e.message.group_id for e in entries])
        for entry, done in zip(entries, settled, strict=True):
            if done or entry.message.group_id in seen:
                self.intake.drop(entry.message, "duplicate", self.version)
                self.queue.ack("groups", [entry.entry_id])  # the ledger keeps the first delivery's outcome
            else:
                seen.add(entry.message.group_id)
                kept.append(entry)
        return kept

    def _dropped(self, entry: QueueEntry) -> bool:
        reason = self.intake.reason_to_drop(entry.message, self.version)
        if reason is not None:
            self.intake.drop(entry.message, reason, self.version)
            dropped = {} if reason == "duplicate" else {entry.message.group_id: reason}
            self.queue.ack("groups", [entry.entry_id], also=self.ledger.settling(dropped))
        return reason is not None
