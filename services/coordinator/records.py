"""Run records: one ``StepRecord`` per learner step (``metrics.jsonl`` and Prometheus both read it) and the
run's summary."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from services.common.ledger import RunLedger
from services.common.messages import LearnerStepMetrics
from services.common.queue import StreamQueue
from services.common.stats import VerifierStats
from services.coordinator.collect import StepBatch
from services.coordinator.intake import GroupIntake, length_histogram
from services.coordinator.rundir import RunDir
from services.coordinator.telemetry import StepExporter


class Phases:
    """Wall time per named phase of the current step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass(frozen=True)
class StepRecord:
    """One learner step as ``metrics.jsonl`` holds it (``as_json`` flattens ``learner`` into the line)."""

    step: int
    version: int
    groups: int
    reward_mean: float
    response_length_mean: float
    lag_histogram: dict[str, int]
    length_histogram: dict[str, int]
    dropped: dict[str, int]
    dropped_length_histogram: dict[str, int]
    dropped_reward_histogram: dict[str, int]
    queue: dict[str, int]
    generator_idle_s: float
    learner_idle_s: float
    generate_s: float
    """Generator seconds spent sampling since the previous step (summed over generators; the weight loads
    are ``weights_s``)."""
    weights_s: float
    """Generator seconds spent fetching and loading weight snapshots in place since the previous step."""
    verify_s: float
    """Verifier seconds spent scoring since the previous step (summed over workers; code: sandbox runs)."""
    phase_s: dict[str, float]
    step_s: float
    learner: LearnerStepMetrics = field(default_factory=LearnerStepMetrics)

    def as_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "learner"}
        return out | self.learner.as_json()


def step_record(
    step: int,
    version: int,
    batch: StepBatch,
    learner: LearnerStepMetrics,
    phases: dict[str, float],
    intake: GroupIntake,
    queue: dict[str, int],
    actor_s: dict[str, float],
) -> StepRecord:
    rewards = [r for g in batch.groups for r in (g.rewards or ())]
    lengths = [r.token_ids.size for g in batch.groups for r in g.rollouts]
    drops = intake.drops
    return StepRecord(
        step=step,
        version=version,
        groups=len(batch.groups),
        reward_mean=sum(rewards) / len(rewards),
        response_length_mean=sum(lengths) / len(lengths),
        lag_histogram={str(k): v for k, v in sorted(Counter(batch.lags).items())},
        length_histogram=length_histogram(batch.groups),
        dropped=dict(drops.by_reason),
        dropped_length_histogram={str(k): v for k, v in sorted(drops.length_hist.items())},
        dropped_reward_histogram={str(k): v for k, v in sorted(drops.reward_hist.items())},
        queue=queue,
        generator_idle_s=actor_s["generator_idle"],
        generate_s=actor_s["generate"],
        weights_s=actor_s["weights"],
        verify_s=actor_s["verify"],
        learner_idle_s=round(phases.get("collect", 0.0), 4),
        phase_s={k: round(v, 4) for k, v in phases.items()},
        step_s=round(sum(phases.values()), 4),
        learner=learner,
    )


def log_step(rundir: RunDir, exporter: StepExporter, record: StepRecord, published_bytes: int) -> None:
    """The record's one line in ``metrics.jsonl`` and its Prometheus series."""
    rundir.log_step(record.as_json())
    exporter.step(record, published_bytes)


def queue_depths(queue: StreamQueue, buffered: int) -> dict[str, int]:
    """Backlog and in-flight entries per stream (for the async-health view)."""
    out = {}
    for stream in ("tasks", "rollouts", "groups"):
        out[f"{stream}_pending"] = queue.pending_count(stream)
        out[f"{stream}_length"] = queue.length(stream)
    out["buffered"] = buffered
    return out


def verifier_totals(stats: list[VerifierStats]) -> dict[str, Any]:
    """The verifier workers' counters summed: responses scored, by verdict status, programs that ran in
    each sandbox backend (code), seconds spent scoring (this process's workers; a restarted one from 0)."""
    statuses: Counter[str] = Counter()
    sandboxed: Counter[str] = Counter()
    for s in stats:
        statuses.update(s.statuses)
        sandboxed.update(s.sandboxed)
    return {
        "workers": len(stats),
        "responses": sum(s.responses for s in stats),
        "by_status": dict(sorted(statuses.items())),
        "sandboxed": dict(sorted(sandboxed.items())),
        "busy_seconds": round(sum(s.busy_s for s in stats), 2),
    }


def summary(
    ledger: RunLedger, rundir: RunDir, intake: GroupIntake, evals: list[dict[str, Any]], *, steps: int,
    version: int, wall_s: float, loop_seconds: float, verifier: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``summary.json`` (and ``ledger.json``: what became of every admitted task)."""

    def brief(e: dict[str, Any]) -> dict[str, Any]:
        sets = {name: {"pass_at": v["pass_at"], "report": v["report"]} for name, v in e["sets"].items()}
        return {"pass_at_1": e["pass_at_1"], "pass_at_k": e["pass_at_k"], "k": e["k"], "sets": sets}

    report = ledger.report()
    rundir.write_json("ledger.json", {"report": report.as_dict(), "tasks": ledger.states()})
    out = {
        "lost": report.lost,
        "duplicates": report.duplicates,
        "ledger": report.as_dict(),
        "steps": steps,
        "wall_seconds": round(wall_s, 2),
        "loop_seconds": round(loop_seconds, 2),
        "trained_groups": report.trained,
        "resumes": rundir.read("resumes.jsonl"),
        "replays": rundir.read("replays.jsonl"),
        "dropped_groups": intake.drops.total,
        "dropped_by_reason": dict(intake.drops.by_reason),
        "final_version": version,
        "final_sha256": intake.history[version],
        "initial_eval": brief(evals[0]),
        "final_eval": brief(evals[-1]),
        "verifier": verifier or {},
    }
    rundir.write_summary(out)
    rundir.plot_curves()
    return out
