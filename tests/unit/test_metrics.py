"""The metric table and the recorder's checks (pure logic: Ray is not started, so nothing is exported here;
tests/e2e/test_submit_observability.py scrapes the real series), and the step exporter's mapping."""

from __future__ import annotations

import pytest

from services.common.messages import LearnerStepMetrics
from services.common.metrics import SPECS, Metrics, MetricSpec, exported_name, exported_names
from services.coordinator.intake import DROP_REASONS
from services.coordinator.records import StepRecord
from services.coordinator.telemetry import StepExporter


def test_names_follow_prometheus_conventions() -> None:
    for spec in SPECS.values():
        assert spec.name.startswith("lpo_") and spec.name == spec.name.lower(), spec.name
        assert not spec.name.endswith("_total"), spec.name  # Ray appends it to counters
        if "seconds" in spec.name or "bytes" in spec.name or "tokens" in spec.name:
            assert spec.name.endswith(("_seconds", "_bytes", "_tokens")), spec.name  # unit last
        assert spec.help and "run" not in spec.tags
    assert exported_name(SPECS["lpo_generator_tokens"]) == "ray_lpo_generator_tokens_total"
    assert exported_name(SPECS["lpo_learner_ess"]) == "ray_lpo_learner_ess"
    assert "ray_lpo_policy_lag_bucket" in exported_names()


def test_spec_invariants() -> None:
    with pytest.raises(ValueError, match="histograms and only histograms"):
        MetricSpec("lpo_x_seconds", "histogram", "h")
    with pytest.raises(ValueError, match="positive, increasing"):
        MetricSpec("lpo_x", "histogram", "h", (), (0.0, 1.0))
    with pytest.raises(ValueError, match="drop it from the name"):
        MetricSpec("lpo_x_total", "counter", "c")


def test_recorder_checks_names_and_tags_even_when_disabled() -> None:
    m = Metrics("r", enabled=False, generator="gen-0")
    assert not m.enabled
    m.inc("lpo_generator_tokens", 5)  # the default tag supplies `generator`
    m.zero("lpo_dropped_groups", reason="stale")
    with pytest.raises(KeyError, match="unknown metric 'lpo_nope'"):
        m.set("lpo_nope", 1)
    with pytest.raises(ValueError, match=r"takes tags \['stream'\]"):
        m.set("lpo_queue_length", 1)
    with pytest.raises(ValueError, match=r"takes tags \[\]"):
        m.observe("lpo_learner_step_seconds", 1.0, phase="x")
    with pytest.raises(ValueError, match="zero\\(\\) is for counters"):
        m.zero("lpo_learner_ess")


class _Recording(Metrics):
    """Records calls instead of exporting them (the exporter's mapping is pure logic)."""

    def __init__(self) -> None:
        super().__init__("r", enabled=False)
        self.calls: list[tuple[str, str, float, dict]] = []

    def inc(self, name, value=1.0, **tags):  # type: ignore[no-untyped-def]
        super().inc(name, value, **tags)
        self.calls.append(("inc", name, value, tags))

    def set(self, name, value, **tags):  # type: ignore[no-untyped-def]
        super().set(name, value, **tags)
        self.calls.append(("set", name, value, tags))

    def observe(self, name, value, **tags):  # type: ignore[no-untyped-def]
        super().observe(name, value, **tags)
        self.calls.append(("observe", name, value, tags))

    def zero(self, name, **tags):  # type: ignore[no-untyped-def]
        super().zero(name, **tags)
        self.calls.append(("zero", name, 0.0, tags))


def _record(dropped: dict[str, int], lags: dict[str, int]) -> StepRecord:
    learner = LearnerStepMetrics.from_flat({
        "kl_forward": 0.02, "kl_reverse": 0.03, "ess": 0.9, "clip_fraction": 0.01, "grad_norm": 0.5,
        "entropy": 1.2, "loss": -0.1, "mismatch_mean": 1e-6, "mismatch_max": 1e-5, "abs_s_t_fresh": 1e-6,
        "abs_s_t_stale": 0.2,
    })  # fmt: skip
    return StepRecord(
        step=3, version=3, groups=4, reward_mean=0.4, response_length_mean=21.5, lag_histogram=lags,
        length_histogram={}, dropped=dropped, dropped_length_histogram={}, dropped_reward_histogram={},
        queue={}, generator_idle_s=0.0, learner_idle_s=0.5, generate_s=1.25, weights_s=0.125, verify_s=0.75,
        phase_s={"admit": 0.01, "collect": 0.5, "train": 1.5, "publish": 0.1}, step_s=2.11, learner=learner,
    )  # fmt: skip


def test_step_exporter_maps_a_record() -> None:
    m = _Recording()
    exporter = StepExporter(m, max_policy_lag=2)
    assert ("set", "lpo_policy_lag_max_allowed", 2, {}) in m.calls
    assert {c[3]["reason"] for c in m.calls if c[0] == "zero"} == set(DROP_REASONS)
    m.calls.clear()
    exporter.step(_record({"stale": 2, "duplicate": 0}, {"0": 1, "1": 2, "2": 1}), published_bytes=4096)
    sets = {(c[1], tuple(sorted(c[3].items()))): c[2] for c in m.calls if c[0] == "set"}
    assert sets[("lpo_learner_kl", (("direction", "reverse"),))] == 0.03
    assert sets[("lpo_learner_abs_s_t", (("groups", "stale"),))] == 0.2
    assert sets[("lpo_learner_phase_seconds", (("phase", "train"),))] == 1.5
    assert sets[("lpo_learner_weights_version", ())] == 3
    assert sets[("lpo_policy_lag_last_max", ())] == 2
    assert sets[("lpo_step_stage_seconds", (("stage", "generate"),))] == 1.25
    assert sets[("lpo_step_stage_seconds", (("stage", "weights"),))] == 0.125
    assert sets[("lpo_step_stage_seconds", (("stage", "verify"),))] == 0.75
    lags = [c[2] for c in m.calls if c[1] == "lpo_policy_lag"]
    assert lags == [0, 1, 1, 2]
    assert ("inc", "lpo_weights_published_bytes", 4096, {}) in m.calls
    assert ("inc", "lpo_dropped_groups", 2, {"reason": "stale"}) in m.calls
    m.calls.clear()
    # Drop totals are cumulative in the record: only the increase since the last step is counted.
    exporter.step(_record({"stale": 5, "duplicate": 0}, {"1": 1}), published_bytes=4096)
    assert ("inc", "lpo_dropped_groups", 3, {"reason": "stale"}) in m.calls
    assert ("inc", "lpo_learner_steps", 1.0, {}) in m.calls


def test_evaluation_export() -> None:
    m = _Recording()
    sets = {"cd34": {"pass_at": {"1": 0.3, "8": 0.6}}, "cd4": {"pass_at": {"1": 0.1, "8": 0.2}}}
    StepExporter(m, 0).evaluation({"pass_at_1": 0.3, "pass_at_k": 0.6, "k": 8, "sets": sets})
    assert ("set", "lpo_eval_pass_at_k", 0.6, {"k": 8}) in m.calls
    assert ("set", "lpo_eval_set_pass_at", 0.1, {"set": "cd4", "k": "1"}) in m.calls
    assert ("set", "lpo_eval_set_pass_at", 0.6, {"set": "cd34", "k": "8"}) in m.calls


class _FakeGauge:
    def __init__(self) -> None:
        self.points: list[tuple[float, dict]] = []

    def set(self, value: float, tags: dict) -> None:
        self.points.append((value, tags))


def test_gauge_keeper_re_records_the_last_value_of_each_series_until_forgotten() -> None:
    # Ray's agent drops a gauge series not re-recorded within two report intervals; the keeper re-records
    # the last value per (recorder, name, tags) and stops for a closed recorder.
    from services.common.metrics import GaugeKeeper

    keeper = GaugeKeeper(period_s=3600.0)  # the thread never fires here; refresh() is called directly
    a, b = _FakeGauge(), _FakeGauge()
    first, second = next(keeper.tokens), next(keeper.tokens)
    keeper.set(first, a, "lpo_queue_length", {"stream": "tasks"}, 1.0)
    keeper.set(first, a, "lpo_queue_length", {"stream": "tasks"}, 4.0)  # replaces, never accumulates
    keeper.set(first, a, "lpo_queue_length", {"stream": "rollouts"}, 2.0)
    keeper.set(second, b, "lpo_learner_weights_version", {}, 7.0)
    assert len(a.points) == 3 and len(b.points) == 1  # set() records at once
    assert keeper.refresh() == 3
    latest = sorted(a.points[-2:], key=lambda p: p[1]["stream"])
    assert latest == [(2.0, {"stream": "rollouts"}), (4.0, {"stream": "tasks"})]
    assert b.points[-1] == (7.0, {})
    keeper.forget(first)
    assert keeper.refresh() == 1 and b.points[-1] == (7.0, {})
    keeper.forget(second)
    assert keeper.refresh() == 0
    keeper.set(second, b, "lpo_learner_weights_version", {}, 8.0)  # a late reading after close
    assert b.points[-1] == (8.0, {}) and keeper.refresh() == 0  # recorded once, never kept


def test_a_disabled_recorder_keeps_nothing() -> None:
    from services.common.metrics import GaugeKeeper

    keeper = GaugeKeeper(period_s=3600.0)
    m = Metrics("r", enabled=False, keeper=keeper)
    m.set("lpo_learner_ess", 0.5)
    assert keeper.refresh() == 0
    m.close()
