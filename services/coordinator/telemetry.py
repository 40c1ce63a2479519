"""The coordinator's Prometheus exports: one learner step's record, the evaluations, and a monitor thread
that polls the queue and the generators' liveness between steps (so a stalled learner still shows a
growing queue and dead generators on the dashboard)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from services.common.metrics import Metrics
from services.common.queue import StreamQueue
from services.coordinator.intake import DROP_REASONS
from services.coordinator.runtime import actor_states

if TYPE_CHECKING:
    from services.coordinator.records import StepRecord

logger = logging.getLogger(__name__)

STREAMS = ("tasks", "rollouts", "groups")

# metrics.jsonl key -> (metric, tags) for the learner's scalar step metrics.
_STEP_GAUGES: dict[str, tuple[str, dict[str, str]]] = {
    "version": ("lpo_learner_weights_version", {}),
    "reward_mean": ("lpo_learner_reward", {}),
    "response_length_mean": ("lpo_learner_response_length_tokens", {}),
    "kl_forward": ("lpo_learner_kl", {"direction": "forward"}),
    "kl_reverse": ("lpo_learner_kl", {"direction": "reverse"}),
    "ess": ("lpo_learner_ess", {}),
    "clip_fraction": ("lpo_learner_clip_fraction", {}),
    "grad_norm": ("lpo_learner_grad_norm", {}),
    "entropy": ("lpo_learner_entropy", {}),
    "loss": ("lpo_learner_loss", {}),
    "mismatch_mean": ("lpo_learner_mismatch", {"stat": "mean"}),
    "mismatch_max": ("lpo_learner_mismatch", {"stat": "max"}),
    "abs_s_t_fresh": ("lpo_learner_abs_s_t", {"groups": "fresh"}),
    "abs_s_t_stale": ("lpo_learner_abs_s_t", {"groups": "stale"}),
}


class StepExporter:
    """Turns each step's ``metrics.jsonl`` record into gauges, counters and histograms."""

    def __init__(self, metrics: Metrics, max_policy_lag: int) -> None:
        self.metrics = metrics
        self._dropped: dict[str, int] = {}
        metrics.set("lpo_policy_lag_max_allowed", max_policy_lag)
        for reason in DROP_REASONS:
            metrics.zero("lpo_dropped_groups", reason=reason)

    def step(self, record: StepRecord, published_bytes: int) -> None:
        m = self.metrics
        flat = record.as_json()
        for key, (name, tags) in _STEP_GAUGES.items():
            if key in flat:
                m.set(name, flat[key], **tags)
        for phase, seconds in record.phase_s.items():
            m.set("lpo_learner_phase_seconds", seconds, phase=phase)
        m.observe("lpo_learner_step_seconds", record.step_s)
        m.observe("lpo_weights_publish_seconds", record.phase_s.get("publish", 0.0))
        m.inc("lpo_weights_published_bytes", published_bytes)
        m.inc("lpo_learner_idle_seconds", record.learner_idle_s)
        m.set("lpo_step_stage_seconds", record.generate_s, stage="generate")
        m.set("lpo_step_stage_seconds", record.weights_s, stage="weights")
        m.set("lpo_step_stage_seconds", record.verify_s, stage="verify")
        lags = [int(lag) for lag, n in record.lag_histogram.items() for _ in range(n)]
        for lag in lags:
            m.observe("lpo_policy_lag", lag)
        m.set("lpo_policy_lag_last_max", max(lags, default=0))
        for reason, total in record.dropped.items():
            m.inc("lpo_dropped_groups", total - self._dropped.get(reason, 0), reason=reason)
            self._dropped[reason] = total
        m.inc("lpo_learner_steps")
        m.set("lpo_learner_last_step_timestamp_seconds", time.time())

    def evaluation(self, result: dict[str, Any]) -> None:
        self.metrics.set("lpo_eval_pass_at_1", result["pass_at_1"])
        self.metrics.set("lpo_eval_pass_at_k", result["pass_at_k"], k=result["k"])
        for name, v in result.get("sets", {}).items():
            for k, p in v["pass_at"].items():
                self.metrics.set("lpo_eval_set_pass_at", p, set=name, k=k)


class Monitor:
    """Every ``interval_s``: stream length, pending count and oldest pending age per stage, and how many
    generator actors answer a control call. Runs on its own thread with its own Redis connection."""

    def __init__(
        self, metrics: Metrics, queue: StreamQueue, generators: Sequence[Any], interval_s: float
    ) -> None:
        self.metrics, self.queue, self.generators = metrics, queue, list(generators)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lpo-monitor", daemon=True)

    def start(self) -> Monitor:
        self.metrics.set("lpo_generators_expected", len(self.generators))
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 10.0)
        self.queue.close()

    def poll(self) -> None:
        """One round of readings (also called directly by tests)."""
        for stream in STREAMS:
            self.metrics.set("lpo_queue_length", self.queue.length(stream), stream=stream)
            self.metrics.set("lpo_queue_pending", self.queue.pending_count(stream), stream=stream)
            self.metrics.set("lpo_queue_backlog", self.queue.backlog(stream), stream=stream)
            age_s = self.queue.oldest_pending_age_ms(stream) / 1000.0
            self.metrics.set("lpo_queue_oldest_pending_age_seconds", age_s, stream=stream)
        alive = actor_states(self.generators).count("alive")
        self.metrics.set("lpo_generators_alive", alive)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # a monitoring hiccup (Redis reconnecting) must never end the run
                logger.warning("metrics poll failed; retrying in %.0fs", self.interval_s, exc_info=True)
