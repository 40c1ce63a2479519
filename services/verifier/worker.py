"""The verifier worker's loop body: score sampled groups and forward them to the learner."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.common.queue import StreamQueue
from services.verifier.scoring import score_group

logger = logging.getLogger(__name__)


@dataclass
class VerifierStats:
    groups: int = 0
    passed: int = 0
    responses: int = 0
    rejected: int = 0


class VerifierWorker:
    """Reads ``:rollouts``, writes scored groups to ``:groups`` (ack after write, in one transaction)."""

    def __init__(self, queue: StreamQueue, *, consumer: str, batch: int = 32) -> None:
        self.queue, self.consumer, self.batch = queue, consumer, batch
        self.stats = VerifierStats()

    def step(self, block_ms: int | None = None) -> int:
        entries = self.queue.read("rollouts", self.consumer, count=self.batch, block_ms=block_ms)
        if not entries:
            return 0
        scored, done = [], []
        for entry in entries:
            try:
                scored.append(score_group(entry.message))
                done.append(entry.entry_id)
            except ValueError as exc:  # bad task data (unknown kind, bad reference): never reward 0
                logger.error("cannot score group %s: %s", entry.message.group_id, exc)
                self.queue.reject("rollouts", entry, f"scoring failed: {exc}")
                self.stats.rejected += 1
        self.queue.forward("rollouts", done, "groups", scored)
        self.stats.groups += len(scored)
        self.stats.responses += sum(len(g.rollouts) for g in scored)
        self.stats.passed += sum(v == "pass" for g in scored for v in (g.verdicts or ()))
        return len(scored)
