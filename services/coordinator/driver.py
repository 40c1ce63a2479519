"""The run loop: Algorithm 1 of the paper with the asynchronous schedule of ``admission.py``.

``Coordinator._steps`` is one learner step per iteration: admit -> (generate, verify) -> collect ->
train -> publish -> ack with the ledger -> checkpoint -> evaluate. Generation and verification run in
the generator and verifier actors' own loops (``Runtime.start_loops``), turning ``:tasks`` into
``:rollouts`` and those into scored ``:groups`` while the coordinator waits in ``collect``; everything
else happens here, in this order. Collection, resume and the run records live in modules of their own.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from services.common.config import RunConfig
from services.common.ledger import RunLedger, both
from services.common.logs import setup_logging
from services.common.metrics import Metrics
from services.common.queue import STREAM_TYPES, StreamQueue
from services.coordinator import records
from services.coordinator.admission import to_admit
from services.coordinator.collect import Collector, StepBatch
from services.coordinator.intake import GroupIntake
from services.coordinator.records import Phases, StepRecord
from services.coordinator.resume import Resumed, RunStateError, replayed_batch, restore
from services.coordinator.rundir import RunDir
from services.coordinator.runtime import Runtime
from services.coordinator.telemetry import Monitor, StepExporter
from services.coordinator.watchdog import Watchdog

logger = logging.getLogger(__name__)

__all__ = ["Coordinator", "RunStateError", "run"]


class Coordinator:
    """One run over live services (``Runtime``); ``resume`` continues the run directory's run."""

    def __init__(self, cfg: RunConfig, rt: Runtime, rundir: RunDir, *, resume: bool = False) -> None:
        from transformers import AutoTokenizer

        from services.coordinator.tasks import TaskSource, eval_sets, rl_exclusions, training_problems

        c = cfg.coordinator
        self.cfg, self.rt, self.rundir = cfg, rt, rundir
        self.queue = StreamQueue(rt.redis_url, c.run_name, block_ms=cfg.queue.block_ms)
        self.queue.ensure_groups()
        self.ledger = RunLedger(self.queue)
        self.eval_sets = eval_sets(cfg)
        tokenizer = AutoTokenizer.from_pretrained(rt.model_dir)
        held = [p for s in self.eval_sets for p in s.problems]
        self.tasks = TaskSource(cfg, training_problems(cfg, exclude=rl_exclusions(cfg, held)), tokenizer)
        self.eval_prompts = {
            s.name: [tokenizer(p.prompt)["input_ids"] for p in s.problems]
            for s in self.eval_sets
            if s.evaluate
        }
        self.metrics = Metrics(c.run_name, enabled=cfg.metrics.enabled)
        self.exporter = StepExporter(self.metrics, c.max_policy_lag)
        self.intake = GroupIntake(c.max_policy_lag)
        watchdog = Watchdog(
            self.queue, rt.generators, rt.verifiers, c.stall_timeout_s, loop_failures=rt.loop_failures
        )
        self.collector = Collector(
            self.queue, self.ledger, self.intake, watchdog, c.prompts_per_step, self.admit
        )
        self.version, self.published_bytes = 0, 0  # the latest snapshot's
        self.evals: list[dict[str, Any]] = []
        self._seen: dict[tuple[str, int], float] = {}  # actor counters' cumulative seconds at the last record
        self.resumed = Resumed()
        if resume:
            self.resumed = restore(
                c.run_name, rundir, rt.learner, self.ledger, self.queue, self.intake, self.tasks
            )
            self.version = self.resumed.version
            self.evals = self.rundir.read("eval.jsonl")
        elif self.ledger.exists():
            raise RunStateError(
                f"Redis at {rt.redis_url} already holds the state of a run named {c.run_name!r}; continue it "
                f"with --resume {rundir.path}, or choose another coordinator.run_name"
            )
        self.step, self.loop_seconds = self.resumed.step, self.resumed.loop_seconds

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict[str, Any]:
        cfg = self.cfg.coordinator
        started = time.perf_counter()
        self.publish()  # version 0 = the base weights (or the resumed checkpoint's), with its sha256
        if not self.evals:
            self.evaluate(step=0)
        self.rt.start_loops()
        monitor_queue = StreamQueue(self.rt.redis_url, cfg.run_name, block_ms=self.cfg.queue.block_ms)
        monitor = Monitor(self.metrics, monitor_queue, self.rt.generators, self.cfg.metrics.poll_s).start()
        try:
            self._steps()
        finally:
            monitor.stop()
        self.evaluate(step=cfg.steps)
        return self.finish(time.perf_counter() - started)

    def _steps(self) -> None:
        c = self.cfg.coordinator
        progress = _progress(c.steps, self.step)
        for step in range(self.step + 1, c.steps + 1):
            phases = Phases()
            with phases("admit"):
                self.admit()  # new tasks on :tasks, as many as the lag bound allows
            # generate: the generator actors sample the admitted tasks (:tasks -> :rollouts);
            # verify: the verifier actors score them (:rollouts -> :groups). Both run in their own loops
            # while this one waits for the step's scored groups:
            with phases("collect"):
                batch = self.next_batch(step)
            with phases("train"):
                metrics = self.rt.learner.train(batch.groups)
            with phases("publish"):
                self.publish()
            self.settle(step, batch)  # ack the groups with the ledger's record, in one transaction
            record = self.record(step, batch, metrics, phases.seconds)
            self.step, self.loop_seconds = step, self.loop_seconds + record.step_s
            if _due(self.cfg.learner.checkpoint_every, step, c.steps):
                self.checkpoint()
            if _due(c.eval_every, step, c.steps):
                self.evaluate(step)
            progress(step, record, self.evals[-1]["pass_at_1"])

    # ------------------------------------------------------------------ the phases

    def admit(self) -> int:
        """Admit what the lag bound allows now, as one batch (one generator read takes it whole)."""
        c = self.cfg.coordinator
        # A dropped group frees its task's slot (a replacement keeps the step full); a duplicate
        # was a second delivery of a task that is counted already.
        freed = self.intake.drops.total - self.intake.drops.by_reason["duplicate"]
        n = to_admit(
            self.tasks.position - freed, self.version, c.prompts_per_step, c.max_policy_lag,
            c.steps * c.prompts_per_step,
        )  # fmt: skip
        tasks = [self.tasks.next(admit_version=self.version) for _ in range(n)]
        also = self.ledger.admitting([t.task_id for t in tasks], cursor=self.tasks.position)
        self.queue.put_many("tasks", tasks, also=also)
        return n

    def next_batch(self, step: int) -> StepBatch:
        """The step's groups: replayed as recorded (a resume), else collected from ``:groups``."""
        planned = self.resumed.replay.pop(step, None)
        if planned is None:
            return self.collector.collect(self.version)
        return replayed_batch(step, *planned, self.intake, self.version)

    def publish(self) -> None:
        snapshot = self.rt.learner.publish()
        self.version, self.published_bytes = snapshot.version, snapshot.nbytes
        self.intake.record_snapshot(snapshot.version, snapshot.sha256)
        self.ledger.record_publication(snapshot.version, snapshot.sha256)

    def settle(self, step: int, batch: StepBatch) -> None:
        """Ack the trained groups only once the update is published, with the ledger's record (and the
        step's, which a resume replays) in the same transaction. A replayed step writes the same records
        again, and logs whether it reproduced the lost learner's weights."""
        trained = [g.group_id for g in batch.groups]
        also = both(
            self.ledger.settling(trained=trained, version=self.version),
            self.ledger.stepping(step, self.version, batch.entry_ids),
        )
        self.queue.ack("groups", batch.entry_ids, also=also)
        self.intake.mark_trained(batch.groups)
        if batch.replayed:
            same = (self.version, self.intake.history[self.version]) in self.resumed.published_before
            self.rundir.log_replay({"step": step, "bit_identical": same})
            logger.info(
                "replayed step %d: weights %s the lost learner's", step, "equal" if same else "differ from"
            )

    def record(self, step: int, batch: StepBatch, metrics: Any, phases: dict[str, float]) -> StepRecord:
        queue = records.queue_depths(self.queue, len(self.collector.buffer))
        record = records.step_record(
            step, self.version, batch, metrics, phases, self.intake, queue, self.actor_seconds()
        )
        records.log_step(self.rundir, self.exporter, record, self.published_bytes)
        return record

    def checkpoint(self) -> None:
        """Learner state (every rank) and HF export, then ``checkpoint.json`` (the commit point), then the
        step records and stream entries it made unnecessary."""
        tag = f"step-{self.step}"
        self.rt.learner.save_checkpoint(str(self.rundir.learner_checkpoints), tag)
        self.rt.learner.save_hf(str(self.rundir.checkpoints / tag))
        drops = self.intake.drops
        state = {
            "history": {str(v): sha for v, sha in self.intake.history.items()},
            "dropped_length_hist": {str(k): n for k, n in drops.length_hist.items()},
            "dropped_reward_hist": {str(k): n for k, n in drops.reward_hist.items()},
            "loop_seconds": self.loop_seconds,
        }  # the dataset cursor and drop counts live in Redis, written with the admissions and acks
        self.rundir.write_json(
            "checkpoint.json", {"step": self.step, "version": self.version, "tag": tag, "coordinator": state}
        )
        self.ledger.forget_steps_through(self.step)
        trimmed = {s: self.queue.trim_acknowledged(s) for s in STREAM_TYPES}
        pruned = self.rundir.prune_checkpoints(self.cfg.learner.keep_checkpoints)
        logger.info("checkpoint %s written; trimmed %s; pruned %s", tag, trimmed, pruned or "none")

    def evaluate(self, step: int) -> dict[str, Any]:
        """Every evaluation set at the current version: sampled by the generators, scored by the verifiers
        (``GeneratorPool`` / ``VerifierPool``), Pass@k computed here."""
        from services.coordinator.evaluation import eval_tasks, headline, reported_ks, summarize
        from services.generator.client import GeneratorPool
        from services.verifier.client import VerifierPool

        c = self.cfg.coordinator
        started = time.perf_counter()
        sets = {}
        for s in (s for s in self.eval_sets if s.evaluate):
            tasks = eval_tasks(self.cfg, s, self.eval_prompts[s.name], step, self.version)
            scored = VerifierPool(self.rt.verifiers).score(GeneratorPool(self.rt.generators).sample(tasks))
            sets[s.name] = summarize(scored, reported_ks(s.samples, c.eval_k)) | {"report": s.report}
        reported = [name for name, v in sets.items() if v["report"]] or list(sets)
        record = {"step": step, "version": self.version, **headline(sets, reported, c.eval_k), "sets": sets}
        record["eval_s"] = round(time.perf_counter() - started, 2)
        self.rundir.log_eval(record)
        self.exporter.evaluation(record)
        self.evals.append(record)
        logger.info("eval step %d (%.0fs): %s", step, record["eval_s"], eval_line(record))
        return record

    def actor_seconds(self) -> dict[str, float]:
        """Seconds the actors spent since the previous step, summed per kind: generators waiting for tasks
        or weights (``generator_idle``), fetching and loading snapshots (``weights``) and sampling
        (``generate``: the rest of their busy time), verifier workers scoring (``verify``; for code, running
        the programs in the sandbox). An actor that does not answer within 5 s (restarting) is left out; a
        restarted one counts from 0 again."""
        from services.coordinator.runtime import poll_stats

        out = {"generator_idle": 0.0, "busy": 0.0, "weights": 0.0, "verify": 0.0}
        polled = [
            *(("generator", i, s) for i, (_, s) in enumerate(poll_stats(self.rt.generators, timeout_s=5.0))),
            *(("verifier", i, s) for i, (_, s) in enumerate(poll_stats(self.rt.verifiers, timeout_s=5.0))),
        ]
        counters = {
            "generator": {"generator_idle": ("idle_s",), "busy": ("busy_s",),
                          "weights": ("weight_fetch_s", "weight_load_s")},
            "verifier": {"verify": ("busy_s",)},
        }  # fmt: skip
        for kind, i, stats in polled:
            if stats is None:
                continue
            for key, attrs in counters[kind].items():
                now, before = sum(getattr(stats, a) for a in attrs), self._seen.get((key, i), 0.0)
                out[key] += now - before if now >= before else now
                self._seen[(key, i)] = now
        # a generator's busy time holds its weight loads (a batch loads the newest snapshot first)
        out["generate"] = max(out.pop("busy") - out["weights"], 0.0)
        return {k: round(v, 4) for k, v in out.items()}

    def finish(self, wall_s: float) -> dict[str, Any]:
        import ray

        from services.coordinator.runtime import poll_stats

        ray.get([g.stop.remote() for g in self.rt.generators + self.rt.verifiers])
        verifiers = [s for _, s in poll_stats(self.rt.verifiers, timeout_s=5.0) if s is not None]
        self.rt.learner.save_hf(str(self.rundir.checkpoints / f"step-{self.cfg.coordinator.steps}"))
        return records.summary(
            self.ledger, self.rundir, self.intake, self.evals, steps=self.cfg.coordinator.steps,
            version=self.version, wall_s=wall_s, loop_seconds=self.loop_seconds,
            verifier=records.verifier_totals(verifiers),
        )  # fmt: skip


def _due(every: int, step: int, last: int) -> bool:
    """Every ``every`` steps, except the last (the run's end does its own)."""
    return bool(every) and step % every == 0 and step < last


def eval_line(record: dict[str, Any], reported_only: bool = False) -> str:
    """``cd34 Pass@1 0.301 Pass@8 0.552 | cd4 ...``: every set of an eval record (validation sets marked)."""
    parts = []
    for name, v in record["sets"].items():
        if reported_only and not v["report"]:
            continue
        ks = " ".join(f"Pass@{k} {p:.3f}" for k, p in v["pass_at"].items())
        parts.append(f"{name}{'' if v['report'] else ' (validation)'} {ks}")
    return " | ".join(parts)


def _progress(total: int, done: int = 0):
    """A tqdm bar showing step, reward, Pass@1 and step time."""
    from tqdm import tqdm

    bar = tqdm(total=total, initial=done, desc="LPO", unit="step", dynamic_ncols=True)

    def update(step: int, record: StepRecord, pass1: float) -> None:
        bar.set_postfix(
            reward=f"{record.reward_mean:.3f}", pass1=f"{pass1:.3f}", step_s=f"{record.step_s:.2f}"
        )
        bar.update(1)
        if step == total:
            bar.close()

    return update


def run(cfg: RunConfig, *, resume: bool = False) -> dict[str, Any]:
    """Start everything, train (or continue the run directory's run), write the run directory, stop
    everything (also on Ctrl-C)."""
    log = setup_logging("coordinator")
    rundir = RunDir(cfg, resume=resume)
    rt = Runtime.start(cfg, redis_dir=rundir.redis_dir)
    coordinator = None
    try:
        coordinator = Coordinator(cfg, rt, rundir, resume=resume)
        summary = coordinator.train()
    finally:
        if coordinator is not None:
            coordinator.metrics.close()  # its gauges stop being re-recorded with the run
        rt.stop()
    i, f = summary["initial_eval"], summary["final_eval"]
    log.info("run directory: %s", rundir.path)
    for name, final in f["sets"].items():
        if final["report"]:
            log.info("%s: %s", name, _change(i["sets"][name]["pass_at"], final["pass_at"]))
    log.info(
        "Pass@1 %.3f -> %.3f (Pass@%d %.3f -> %.3f) in %.0fs",
        i["pass_at_1"], f["pass_at_1"], f["k"], i["pass_at_k"], f["pass_at_k"], summary["wall_seconds"],
    )  # fmt: skip
    return summary


def _change(before: dict[str, float], after: dict[str, float]) -> str:
    return ", ".join(f"Pass@{k} {before[k]:.3f} -> {after[k]:.3f}" for k in after)
