"""Every Prometheus metric of a run, defined once, exported through ``ray.util.metrics``.

Ray's metrics agent on each node serves what the actors and the driver record here on the node's
metrics-export port, and writes ``<ray temp dir>/prom_metrics_service_discovery.json`` for Prometheus
(``deploy/prometheus/prometheus.yml``). Ray prefixes every name with ``ray_`` and exports a counter as
``<name>_total``: ``exported_name`` gives the name PromQL sees, and the dashboard and alert rules are
checked against this table in the tests. Every series carries the ``run`` tag.

Names follow Prometheus conventions: base units (``_seconds``, ``_bytes``, ``_tokens``), counters
without ``_total`` (Ray appends it), no unit on ratios.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

logger = logging.getLogger(__name__)

Kind = Literal["counter", "gauge", "histogram"]

_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_LAG = (0.5, 1.5, 2.5, 3.5, 4.5, 6.5, 8.5, 16.5, 32.5)  # integer lags: bucket le="0.5" holds lag 0


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric: its Ray name (no ``ray_`` prefix, no ``_total``), kind, help text and tag keys
    (besides ``run``); histograms also carry their bucket boundaries."""

    name: str
    kind: Kind
    help: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if (self.kind == "histogram") != bool(self.boundaries):
            raise ValueError(f"{self.name}: histograms and only histograms have boundaries")
        if any(b <= 0 for b in self.boundaries) or list(self.boundaries) != sorted(set(self.boundaries)):
            raise ValueError(f"{self.name}: Ray needs positive, increasing bucket boundaries")
        if self.kind == "counter" and self.name.endswith("_total"):
            raise ValueError(f"{self.name}: Ray appends _total to counters; drop it from the name")


def _C(name: str, help: str, tags: tuple[str, ...] = ()) -> MetricSpec:
    return MetricSpec(name, "counter", help, tags)


def _G(name: str, help: str, tags: tuple[str, ...] = ()) -> MetricSpec:
    return MetricSpec(name, "gauge", help, tags)


def _H(name: str, help: str, boundaries: tuple[float, ...], tags: tuple[str, ...] = ()) -> MetricSpec:
    return MetricSpec(name, "histogram", help, tags, boundaries)


_ALL = (
    # ---- learner (recorded by the coordinator from the learner group's step result)
    _C("lpo_learner_steps", "Learner optimizer steps (rollout batches) completed"),
    _G("lpo_learner_last_step_timestamp_seconds", "Unix time of the last learner step"),
    _G("lpo_learner_weights_version", "Policy version the learner last published"),
    _G("lpo_learner_reward", "Mean reward of the groups trained in the last step"),
    _G("lpo_learner_kl", "Mean KL between target and policy (forward, reverse)", ("direction",)),
    _G("lpo_learner_ess", "Effective sample size of p_proximal, 1/(K sum p^2), in (0, 1]"),
    _G("lpo_learner_clip_fraction", "Share of tokens outside the trust-region clamp"),
    _G("lpo_learner_grad_norm", "Global gradient norm before clipping"),
    _G("lpo_learner_entropy", "Mean entropy of the sampled tokens (nats)"),
    _G("lpo_learner_loss", "Surrogate loss of the last step"),
    _G("lpo_learner_response_length_tokens", "Mean response length of the last step"),
    _G("lpo_learner_mismatch", "Train/inference |logp_t - logp_b| per token", ("stat",)),
    _G("lpo_learner_abs_s_t", "Mean |s_t| of fresh and stale groups", ("groups",)),
    _G("lpo_learner_phase_seconds", "Seconds of each phase of the last step", ("phase",)),
    _H("lpo_learner_step_seconds", "Wall seconds per learner step", _SECONDS),
    _C("lpo_learner_idle_seconds", "Seconds the learner waited for scored groups"),
    _G("lpo_eval_pass_at_1", "Expected Pass@1 on the held-out problems"),
    _G("lpo_eval_pass_at_k", "Unbiased Pass@k on the held-out problems", ("k",)),
    _G("lpo_eval_set_pass_at", "Unbiased Pass@k of each evaluation set (k=1: expected Pass@1)", ("set", "k")),
    # ---- staleness
    _H("lpo_policy_lag", "Learner version minus behaviour version of trained groups", _LAG),
    _G("lpo_policy_lag_max_allowed", "coordinator.max_policy_lag of the run"),
    _G("lpo_policy_lag_last_max", "Largest lag among the groups of the last step"),
    _C("lpo_dropped_groups", "Groups not trained, by reason", ("reason",)),
    # ---- queue (polled by the coordinator)
    _G("lpo_queue_length", "Entries in the stream (until trimmed)", ("stream",)),
    _G("lpo_queue_pending", "Entries delivered and not yet acknowledged", ("stream",)),
    _G("lpo_queue_backlog", "Entries the stage has not acknowledged (pending + undelivered)", ("stream",)),
    _G("lpo_queue_oldest_pending_age_seconds", "Age of the oldest unacked entry", ("stream",)),
    _G("lpo_generators_alive", "Generator actors answering the coordinator"),
    _G("lpo_generators_expected", "Generator actors the run config asks for"),
    # ---- generators
    _C("lpo_generator_tokens", "Response tokens sampled", ("generator",)),
    _C("lpo_generator_groups", "Response groups sampled", ("generator",)),
    _G("lpo_generator_weights_version", "Snapshot version loaded in the engine", ("generator",)),
    _C("lpo_generator_idle_seconds", "Seconds waiting for tasks or weights", ("generator",)),
    _C("lpo_generator_engine_restarts", "vLLM engines recreated after a failure", ("generator",)),
    # ---- weight sync
    _H("lpo_weights_publish_seconds", "Seconds to export and publish a snapshot", _SECONDS),
    _C("lpo_weights_published_bytes", "Snapshot bytes published"),
    _H("lpo_weights_fetch_seconds", "Seconds to fetch and verify a snapshot", _SECONDS, ("generator",)),
    _H("lpo_weights_load_seconds", "Seconds to load a snapshot in place", _SECONDS, ("generator",)),
    _C("lpo_weights_fetched_bytes", "Snapshot bytes fetched", ("generator",)),
    # ---- verifier workers
    _H("lpo_verifier_group_seconds", "Seconds to score one group", _SECONDS, ("task",)),
    _C("lpo_verifier_outcomes", "Scored responses by verdict status", ("task", "status")),
    _C("lpo_verifier_rejected_groups", "Groups dead-lettered because scoring failed"),
    _C("lpo_verifier_busy_seconds", "Seconds spent scoring (code: running programs in a sandbox)", ("task",)),
    _G(
        "lpo_step_stage_seconds",
        "Actor seconds in the last step, by stage (generate, weights, verify)",
        ("stage",),
    ),
)
SPECS: dict[str, MetricSpec] = {s.name: s for s in _ALL}


def exported_name(spec: MetricSpec) -> str:
    """The name PromQL sees: ``ray_<name>``, plus ``_total`` for counters."""
    return f"ray_{spec.name}_total" if spec.kind == "counter" else f"ray_{spec.name}"


def exported_names() -> set[str]:
    """Every series name the service exports (histograms as their ``_bucket``/``_sum``/``_count``)."""
    out: set[str] = set()
    for spec in SPECS.values():
        base = exported_name(spec)
        out |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"} if spec.kind == "histogram" else {base}
    return out


def _report_interval_s() -> float:
    """Ray's export cadence in this process: ``max(metrics_report_interval_ms, 1000)`` ms."""
    try:
        import ray

        return max(float(ray._config.metrics_report_interval_ms()), 1000.0) / 1000.0
    except Exception:  # noqa: BLE001 - an older or unstarted Ray: Ray's default cadence
        return 10.0


class GaugeKeeper:
    """Re-records the last value of every gauge series of this process every half report interval.

    Ray's metrics agent keeps a gauge series only for two export intervals after it was last recorded
    (ray-project/ray#64633, in the pinned 2.60): a gauge set once, or less often than every ~20 s,
    vanishes from ``/metrics`` and Prometheus. Ours carry state that changes rarely (the weights
    version, the last step's timestamp, eval Pass@1, the expected generator count, every learner
    gauge when a step takes minutes), and the alert rules and dashboard read them between changes, so
    each process keeps its values alive until it exits (when the series should age out) or the
    ``Metrics`` is closed. One daemon thread per process, started with the first kept gauge."""

    def __init__(self, period_s: float | None = None) -> None:
        self.period_s = period_s
        self._lock = threading.Lock()
        self._values: dict[tuple[int, str, tuple[tuple[str, str], ...]], tuple[Any, dict, float]] = {}
        self.tokens = itertools.count()
        self._closed: set[int] = set()
        self._thread: threading.Thread | None = None
        if hasattr(os, "register_at_fork"):  # a forked child starts with no thread, lock or values
            os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._values.clear()
        self._thread = None

    def set(self, owner: int, metric: Any, name: str, tags: dict[str, str], value: float) -> None:
        """Set the gauge and keep its value (under the lock a refresh holds, so a refresh never
        re-records an older value over a newer one)."""
        with self._lock:
            metric.set(value, tags=tags)
            if owner in self._closed:  # a late reading after close(): exported once, not kept
                return
            self._values[(owner, name, tuple(sorted(tags.items())))] = (metric, tags, value)
            if self._thread is None:
                if self.period_s is None:
                    self.period_s = _report_interval_s() / 2.0
                self._thread = threading.Thread(target=self._loop, name="lpo-gauge-keeper", daemon=True)
                self._thread.start()

    def forget(self, owner: int) -> None:
        with self._lock:
            self._closed.add(owner)
            for key in [k for k in self._values if k[0] == owner]:
                del self._values[key]

    def refresh(self) -> int:
        """Re-record every kept value now; returns how many (called by the thread, and by tests)."""
        with self._lock:
            for metric, tags, value in self._values.values():
                try:
                    metric.set(value, tags=tags)
                except Exception:  # noqa: BLE001 - telemetry never takes the process down
                    logger.debug("gauge refresh failed", exc_info=True)
            return len(self._values)

    def _loop(self) -> None:
        while True:
            time.sleep(self.period_s or 5.0)
            self.refresh()


_KEEPER = GaugeKeeper()


class Metrics:
    """Records the metrics of ``SPECS`` for one run from one process. Disabled (``metrics.enabled:
    false``) or outside Ray it records nothing, so pure-logic code and unit tests can hold one.
    Gauges stay exported at their last value until :meth:`close` or the process ends (``GaugeKeeper``)."""

    def __init__(
        self, run: str, *, enabled: bool = True, keeper: GaugeKeeper | None = None, **tags: str
    ) -> None:
        import ray

        self.run, self.tags = run, {k: str(v) for k, v in tags.items()}
        self.enabled = enabled and ray.is_initialized()
        self._made: dict[str, Any] = {}
        self._keeper = keeper or _KEEPER
        self._token = next(self._keeper.tokens)

    def close(self) -> None:
        """Stop re-recording this recorder's gauges (their series then age out in two intervals)."""
        self._keeper.forget(self._token)

    def _metric(self, name: str) -> Any:
        metric = self._made.get(name)
        if metric is None:
            from ray.util import metrics as rm

            spec = SPECS[name]
            keys = ("run", *spec.tags)
            if spec.kind == "counter":
                metric = rm.Counter(name, description=spec.help, tag_keys=keys)
            elif spec.kind == "gauge":
                metric = rm.Gauge(name, description=spec.help, tag_keys=keys)
            else:
                bounds = list(spec.boundaries)
                metric = rm.Histogram(name, description=spec.help, boundaries=bounds, tag_keys=keys)
            metric.set_default_tags({"run": self.run, **{k: v for k, v in self.tags.items() if k in keys}})
            self._made[name] = metric
        return metric

    def _tags(self, name: str, tags: dict[str, Any]) -> dict[str, str]:
        """Checked even when disabled, so unit tests of the instrumented code catch a wrong name or tag."""
        if name not in SPECS:
            raise KeyError(f"unknown metric {name!r}; define it in services/common/metrics.py SPECS")
        want = set(SPECS[name].tags)
        given = {k: str(v) for k, v in tags.items()}
        missing = want - given.keys() - self.tags.keys()
        if missing or not given.keys() <= want:
            raise ValueError(f"metric {name} takes tags {sorted(want)}; got {sorted(given)}")
        return given

    def inc(self, name: str, value: float = 1.0, **tags: Any) -> None:
        """Add ``value`` (> 0) to a counter; zero increments are skipped (Ray refuses them)."""
        checked = self._tags(name, tags)
        if self.enabled and value > 0:
            self._metric(name).inc(value, tags=checked)

    def zero(self, name: str, **tags: Any) -> None:
        """Create a counter's series at 0 before its first event (Prometheus practice: a rate or an alert on
        a rare event needs the series to exist). Ray's public ``inc`` refuses 0, so this records the point
        through ``Metric._record``, the call ``inc`` itself makes (ray pinned in requirements/cpu.lock;
        the Prometheus integration test sees these series)."""
        checked = self._tags(name, tags)
        if SPECS[name].kind != "counter":
            raise ValueError(f"zero() is for counters; {name} is a {SPECS[name].kind}")
        if self.enabled:
            self._metric(name)._record(0.0, tags=checked)

    def set(self, name: str, value: float, **tags: Any) -> None:
        """Set a gauge."""
        checked = self._tags(name, tags)
        if self.enabled:
            self._keeper.set(self._token, self._metric(name), name, checked, float(value))

    def observe(self, name: str, value: float, **tags: Any) -> None:
        """Add one observation to a histogram."""
        checked = self._tags(name, tags)
        if self.enabled:
            self._metric(name).observe(float(value), tags=checked)
