"""The verifier worker's loop body: score sampled groups and forward them to the learner."""

from __future__ import annotations

import logging
import time

from services.common.metrics import Metrics
from services.common.queue import StreamQueue
from services.common.stats import VerifierStats
from services.verifier.rules.verdict import STATUSES
from services.verifier.scoring import score_verdicts

logger = logging.getLogger(__name__)


class VerifierWorker:
    """Reads ``:rollouts``, writes scored groups to ``:groups`` (ack after write, in one transaction)."""

    def __init__(
        self,
        queue: StreamQueue,
        *,
        consumer: str,
        batch: int = 32,
        task_kind: str = "countdown",
        claim_idle_ms: int | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.queue, self.consumer, self.batch, self.claim_idle_ms = queue, consumer, batch, claim_idle_ms
        self.stats = VerifierStats()
        self.metrics = metrics or Metrics(queue.run, enabled=False)
        self.metrics.zero("lpo_verifier_rejected_groups")
        self.metrics.zero("lpo_verifier_busy_seconds", task=task_kind)
        for status in STATUSES:  # every verdict status has a series from the start
            self.metrics.zero("lpo_verifier_outcomes", task=task_kind, status=status)

    def step(self, block_ms: int | None = None) -> int:
        entries = self.queue.read_or_claim(
            "rollouts", self.consumer, count=self.batch, block_ms=block_ms, claim_idle_ms=self.claim_idle_ms
        )
        if not entries:
            return 0
        scored, done = [], []
        for entry in entries:
            started = time.perf_counter()
            try:
                group, verdicts = score_verdicts(entry.message)
            except ValueError as exc:  # bad task data (unknown kind, bad reference): never reward 0
                logger.error("cannot score group %s: %s", entry.message.group_id, exc)
                self.queue.reject("rollouts", entry, f"scoring failed: {exc}")
                self.stats.rejected += 1
                self.metrics.inc("lpo_verifier_rejected_groups")
                continue
            kind, seconds = group.task.task_kind, time.perf_counter() - started
            self.metrics.observe("lpo_verifier_group_seconds", seconds, task=kind)
            self.metrics.inc("lpo_verifier_busy_seconds", seconds, task=kind)
            self.stats.busy_s += seconds
            for v in verdicts:
                self.metrics.inc("lpo_verifier_outcomes", task=kind, status=v.status)
                self.stats.statuses[v.status] = self.stats.statuses.get(v.status, 0) + 1
                backend = getattr(v, "isolation", None)  # code verdicts: the backend that ran the program
                if backend and v.status in ("pass", "fail", "timeout"):  # the program ran
                    self.stats.sandboxed[backend] = self.stats.sandboxed.get(backend, 0) + 1
            scored.append(group)
            done.append(entry.entry_id)
        self.queue.forward("rollouts", done, "groups", scored)
        self.stats.groups += len(scored)
        self.stats.responses += sum(len(g.rollouts) for g in scored)
        self.stats.passed += sum(v == "pass" for g in scored for v in (g.verdicts or ()))
        return len(scored)
