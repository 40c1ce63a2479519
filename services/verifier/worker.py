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


class VerifierWorker:
    """Reads ``:rollouts``, writes scored groups to ``:groups`` (ack after write, in one transaction)."""

    def __init__(self, queue: StreamQueue, *, consumer: str, batch: int = 32) -> None:
        self.queue, self.consumer, self.batch = queue, consumer, batch
        self.stats = VerifierStats()

    def step(self, block_ms: int | None = None) -> int:
        entries = self.queue.read("rollouts", self.consumer, count=self.batch, block_ms=block_ms)
        if not entries:
            return 0
        scored = [score_group(e.message) for e in entries]
        self.queue.forward("rollouts", [e.entry_id for e in entries], "groups", scored)
        self.stats.groups += len(scored)
        self.stats.responses += sum(len(g.rollouts) for g in scored)
        self.stats.passed += sum(v == "pass" for g in scored for v in (g.verdicts or ()))
        return len(scored)
