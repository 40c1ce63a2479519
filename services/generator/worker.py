"""The generator's loop body: keep weights current, turn tasks into sampled groups.

Weights change only between batches (a safe point), so every group is sampled by exactly one
snapshot, whose version and sha256 the group carries as its behaviour policy.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from services.common.messages import ResponseGroup, RolloutTask, WeightSnapshot
from services.common.metrics import Metrics
from services.common.queue import StreamQueue
from services.common.stats import GeneratorStats
from services.common.weights import WeightTransport
from services.generator.interface import RolloutEngine

logger = logging.getLogger(__name__)


def _payload_dir() -> Path:
    """tmpfs when there is one: a snapshot file is written once and read once by vLLM's worker."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


class Generator:
    """Reads tasks, samples with the current snapshot, forwards groups to the verifiers."""

    def __init__(
        self,
        engine: RolloutEngine,
        queue: StreamQueue,
        transport: WeightTransport,
        *,
        consumer: str,
        batch_tasks: int = 16,
        claim_idle_ms: int | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` (seconds) times the idle, busy and weight-load statistics and the version wait."""
        self.engine, self.queue, self.transport = engine, queue, transport
        self.clock = clock
        self.consumer, self.batch_tasks, self.claim_idle_ms = consumer, batch_tasks, claim_idle_ms
        self.snapshot: WeightSnapshot | None = None
        self.stats = GeneratorStats(started=clock())
        self.metrics = metrics or Metrics(queue.run, enabled=False, generator=consumer)
        self.metrics.zero("lpo_generator_engine_restarts")

    @property
    def version(self) -> int:
        return -1 if self.snapshot is None else self.snapshot.version

    def sync_weights(self) -> bool:
        """Load the latest announced snapshot if it is newer than ours; True if weights changed."""
        latest = self.transport.latest()
        if latest is None or latest.version <= self.version:
            return False
        started = self.clock()
        payload = self.transport.fetch_payload(latest)  # size and sha256 verified
        fetched = self.clock()
        path = _payload_dir() / f"lpo-{self.consumer}-{os.getpid()}-v{latest.version}.bin"
        restarts = self.engine.restarts
        try:
            path.write_bytes(memoryview(payload))
            self.engine.load_weights(path, latest.manifest)
        finally:
            path.unlink(missing_ok=True)
            self.metrics.inc("lpo_generator_engine_restarts", self.engine.restarts - restarts)
        loaded = self.clock()
        self.snapshot = latest
        self.stats.weight_loads += 1
        self.stats.weight_fetch_s += fetched - started
        self.stats.weight_load_s += loaded - fetched
        self.metrics.observe("lpo_weights_fetch_seconds", fetched - started)
        self.metrics.observe("lpo_weights_load_seconds", loaded - fetched)
        self.metrics.inc("lpo_weights_fetched_bytes", len(payload))
        self.metrics.set("lpo_generator_weights_version", latest.version)
        logger.info("%s loaded snapshot v%d in %.2fs", self.consumer, latest.version, loaded - started)
        return True

    def wait_for_version(self, version: int, timeout_s: float = 600.0) -> None:
        """Block until a snapshot >= ``version`` is loaded (a task admitted for that policy)."""
        deadline = self.clock() + timeout_s
        while self.version < version:
            if not self.sync_weights():
                if self.clock() > deadline:
                    raise TimeoutError(
                        f"{self.consumer}: snapshot v{version} not announced within {timeout_s}s"
                    )
                time.sleep(0.05)

    def step(self, block_ms: int | None = None) -> int:
        """One batch: read up to ``batch_tasks`` tasks, sample, forward. Returns groups produced."""
        t0 = self.clock()
        entries = self.queue.read_or_claim(
            "tasks",
            self.consumer,
            count=self.batch_tasks,
            block_ms=block_ms,
            claim_idle_ms=self.claim_idle_ms,
        )
        if not entries:
            self.sync_weights()
            self._idle(self.clock() - t0)
            return 0
        t1 = self.clock()
        self._idle(t1 - t0)
        groups = self.sample([e.message for e in entries])
        self.queue.forward("tasks", [e.entry_id for e in entries], "rollouts", groups)
        self.stats.busy_s += self.clock() - t1
        return len(groups)

    def _idle(self, seconds: float) -> None:
        self.stats.idle_s += seconds
        self.metrics.inc("lpo_generator_idle_seconds", seconds)

    def sample(self, tasks: list[RolloutTask], *, record: bool = True) -> list[ResponseGroup]:
        """Sample every task with one snapshot: the newest one at this safe point, and at least the
        version each task was admitted for. ``record``: count them as training groups (evaluation
        groups are not)."""
        self.wait_for_version(max(t.admit_version for t in tasks))
        self.sync_weights()
        snapshot = self.snapshot
        assert snapshot is not None  # wait_for_version loaded one
        sampled = self.engine.generate(tasks)
        groups = [
            ResponseGroup(
                task=task,
                rollouts=tuple(rollouts),
                behavior_version=snapshot.version,
                behavior_sha256=snapshot.sha256,
                generator_id=self.consumer,
            )
            for task, rollouts in zip(tasks, sampled, strict=True)
        ]
        if not record:
            return groups
        tokens = sum(r.token_ids.size for g in groups for r in g.rollouts)
        self.stats.groups += len(groups)
        self.stats.tokens += tokens
        self.stats.batches += 1
        self.metrics.inc("lpo_generator_groups", len(groups))
        self.metrics.inc("lpo_generator_tokens", tokens)
        return groups
