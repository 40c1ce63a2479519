"""The run loop: admit -> collect -> train -> publish -> record, with periodic evaluation.

Reads like Algorithm 1 of the paper with the asynchronous schedule of ``admission.py``: generators
and verifiers run on their own; the coordinator only admits tasks, hands complete scored groups to
the learner, and publishes the new policy.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from services.common.config import RunConfig
from services.common.ledger import RunLedger, both
from services.common.logs import setup_logging
from services.common.messages import ResponseGroup
from services.common.metrics import Metrics
from services.common.queue import STREAM_TYPES, QueueEntry, StreamQueue, entry_order
from services.coordinator.admission import policy_lag, to_admit
from services.coordinator.rundir import RunDir
from services.coordinator.runtime import Runtime
from services.coordinator.telemetry import Monitor, StepExporter
from services.coordinator.watchdog import Watchdog
from services.learner.intake import GroupIntake, length_histogram

logger = logging.getLogger(__name__)


class Phases:
    """Wall time per named phase of the current step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class RunStateError(RuntimeError):
    """The queue's state does not fit what was asked (a fresh run over an old run's keys, a broken resume)."""


class Coordinator:
    """One run over live services (``Runtime``); ``resume`` continues the run directory's run.

    State a resume restores: the learner (DeepSpeed checkpoint: weights, optimizer, RNG, version), the
    snapshot history and drop statistics (``checkpoint.json``), the dataset cursor, drop counts and
    trained tasks (the ledger in Redis), and the steps trained since the checkpoint (the ledger's step
    records), which are replayed with exactly the same groups before new ones are collected.
    """

    def __init__(self, cfg: RunConfig, rt: Runtime, rundir: RunDir, *, resume: bool = False) -> None:
        from transformers import AutoTokenizer

        from services.coordinator.tasks import TaskSource, eval_sets, rl_exclusions, training_problems

        self.cfg, self.rt, self.rundir = cfg, rt, rundir
        self.queue = StreamQueue(rt.redis_url, cfg.coordinator.run_name, block_ms=cfg.queue.block_ms)
        self.queue.ensure_groups()
        self.ledger = RunLedger(self.queue)
        self.watchdog = Watchdog(self.queue, rt.generators, rt.verifiers, cfg.coordinator.stall_timeout_s)
        self.eval_sets = eval_sets(cfg)
        tokenizer = AutoTokenizer.from_pretrained(rt.model_dir)
        held = [p for s in self.eval_sets for p in s.problems]
        problems = training_problems(cfg, exclude=rl_exclusions(cfg, held))
        self.tasks = TaskSource(cfg, problems, tokenizer)
        self.eval_prompts = {
            s.name: [tokenizer(p.prompt)["input_ids"] for p in s.problems]
            for s in self.eval_sets
            if s.evaluate
        }
        self.version = 0
        self.published_bytes = 0  # of the latest snapshot
        self.metrics = Metrics(cfg.coordinator.run_name, enabled=cfg.metrics.enabled)
        self.exporter = StepExporter(self.metrics, cfg.coordinator.max_policy_lag)
        self.intake = GroupIntake(cfg.coordinator.max_policy_lag)
        self.buffer: list[QueueEntry] = []  # read, admissible, not yet trained (oldest first)
        self.evals: list[dict[str, Any]] = []
        self._gen_idle: dict[int, float] = {}  # each generator's cumulative idle seconds at the last record
        self.loop_seconds = 0.0
        self.step = 0  # learner steps done
        self.replay: dict[int, tuple[int, list[QueueEntry]]] = {}  # step -> (version, its groups' entries)
        self.published_before: set[tuple[int, str]] = set()  # (version, sha256) published before a resume
        if resume:
            self._restore()
        elif self.ledger.exists():
            raise RunStateError(
                f"Redis at {rt.redis_url} already holds the state of a run named "
                f"{cfg.coordinator.run_name!r}; continue it with --resume {rundir.path}, or choose another "
                "coordinator.run_name"
            )

    def _restore(self) -> None:
        """Continue from the newest checkpoint (or the base model if none was written)."""
        ckpt = self.rundir.read_checkpoint()
        if ckpt is not None:
            version = self.rt.learner.load_checkpoint(str(self.rundir.learner_checkpoints), ckpt["tag"])
            if version != ckpt["version"]:
                raise RunStateError(
                    f"checkpoint {ckpt['tag']} holds v{version}, checkpoint.json says v{ckpt['version']}"
                )
            state = ckpt["coordinator"]
            self.step, self.version = ckpt["step"], version
            self.intake.history = {int(v): sha for v, sha in state["history"].items()}
            self.intake.drops.length_hist.update({int(k): n for k, n in state["dropped_length_hist"].items()})
            self.intake.drops.reward_hist.update(
                {float(k): n for k, n in state["dropped_reward_hist"].items()}
            )
            self.loop_seconds = state["loop_seconds"]
        report = self.ledger.report()
        self.intake.drops.by_reason.update(report.dropped_by_reason)
        self.published_before = self.ledger.publications()
        self.intake.earlier = {p for p in self.published_before if self.intake.history.get(p[0]) != p[1]}
        self.tasks.position = self.ledger.cursor()
        for step, version, ids in self.ledger.steps_after(self.step):
            self.replay[step] = (version, self.queue.fetch("groups", ids))
        replayed = {e.message.group_id for _, entries in self.replay.values() for e in entries}
        self.intake.trained = self.ledger.trained_tasks() - replayed
        self.rundir.truncate_after(self.step)
        self.evals = self.rundir.read("eval.jsonl")
        resume = {
            "from_step": self.step,
            "replayed_steps": sorted(self.replay),
            "cursor": self.tasks.position,
            "ledger": report.as_dict(),
            "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        self.rundir.log_resume(resume)
        logger.warning(
            "resuming %s from step %d (v%d): replaying steps %s, then continuing at task %d",
            self.cfg.coordinator.run_name, self.step, self.version, sorted(self.replay) or "none",
            self.tasks.position,
        )  # fmt: skip

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
        cfg = self.cfg.coordinator
        progress = _progress(cfg.steps, self.step)
        for step in range(self.step + 1, cfg.steps + 1):
            phases = Phases()
            with phases("admit"):
                self.admit()
            with phases("collect"):
                planned = self.replay.pop(step, None)
                groups, entry_ids, lags = self.collect() if planned is None else self.replayed(step, *planned)
            with phases("train"):
                metrics = self.rt.learner.train(groups)
            with phases("publish"):
                self.publish()
            if planned is not None:
                same = (self.version, self.intake.history[self.version]) in self.published_before
                self.rundir.log_replay({"step": step, "bit_identical": same})
                logger.info(
                    "replayed step %d: weights %s the lost learner's",
                    step,
                    "equal" if same else "differ from",
                )
            # Acked only once the update is published, with the ledger's record (and the step's, which a
            # resume replays) in the same transaction. A replayed step writes the same records again.
            trained = [g.group_id for g in groups]
            self.queue.ack(
                "groups",
                entry_ids,
                also=both(
                    self.ledger.settling(trained=trained, version=self.version),
                    self.ledger.stepping(step, self.version, entry_ids),
                ),
            )
            self.intake.mark_trained(groups)
            self.step = step
            record = self.record(step, groups, metrics, lags, phases.seconds)
            self.loop_seconds += record["step_s"]
            every = self.cfg.learner.checkpoint_every
            if every and step % every == 0 and step < cfg.steps:
                self.checkpoint()
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                self.evaluate(step)
            progress(step, record, self.evals[-1]["pass_at_1"])

    def replayed(
        self, step: int, version: int, entries: list[QueueEntry]
    ) -> tuple[list[ResponseGroup], list[str], list[int]]:
        """A step trained before the run was killed and lost with the learner: the same groups, in the
        same order, checked on receipt like any others (against the published snapshots)."""
        if version != self.version + 1:
            raise RunStateError(
                f"step {step} was recorded at v{version}; the resumed learner is at v{self.version}"
            )
        for e in entries:
            reason = self.intake.reason_to_drop(e.message, self.version)
            if reason is not None:
                raise RunStateError(
                    f"replaying step {step}: group {e.message.group_id} would be dropped ({reason}); the run "
                    "directory's checkpoint and the Redis state do not belong together"
                )
        groups = [e.message for e in entries]
        return (
            groups,
            [e.entry_id for e in entries],
            [policy_lag(self.version, g.behavior_version) for g in groups],
        )

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

    def publish(self) -> None:
        snapshot = self.rt.learner.publish()
        self.version, self.published_bytes = snapshot.version, snapshot.nbytes
        self.intake.record_snapshot(snapshot.version, snapshot.sha256)
        self.ledger.record_publication(snapshot.version, snapshot.sha256)

    def admit(self) -> int:
        """Admit what the lag bound allows now, as one batch (one generator read takes it whole)."""
        c = self.cfg.coordinator
        # A dropped group frees its task's slot (a replacement keeps the step full); a duplicate
        # was a second delivery of a task that is counted already.
        freed = self.intake.drops.total - self.intake.drops.by_reason["duplicate"]
        n = to_admit(
            self.tasks.position - freed,
            self.version,
            c.prompts_per_step,
            c.max_policy_lag,
            c.steps * c.prompts_per_step,
        )
        tasks = [self.tasks.next(admit_version=self.version) for _ in range(n)]
        also = self.ledger.admitting([t.task_id for t in tasks], cursor=self.tasks.position)
        self.queue.put_many("tasks", tasks, also=also)
        return n

    def collect(self) -> tuple[list[ResponseGroup], list[str], list[int]]:
        """The next ``prompts_per_step`` admissible scored groups, oldest behaviour version first."""
        want = self.cfg.coordinator.prompts_per_step
        drops = self.intake.drops.total
        self.buffer = [e for e in self.buffer if not self._dropped(e)]  # the version moved: re-check
        self._admit_if_freed(drops)
        self._take(self._lost_reads())
        self.watchdog.progress()
        while len(self.buffer) < want:
            fresh = self.queue.read("groups", "learner", count=max(want, 64)) or self._lost_reads()
            if fresh:
                self.watchdog.progress()
            else:
                self.watchdog.check(len(self.buffer), want)  # raises RunStalled naming the stuck stage
            self._take(fresh)
        self.buffer.sort(key=lambda e: (e.message.behavior_version, entry_order(e.entry_id)))
        take, self.buffer = self.buffer[:want], self.buffer[want:]
        groups = [e.message for e in take]
        return (
            groups,
            [e.entry_id for e in take],
            [policy_lag(self.version, g.behavior_version) for g in groups],
        )

    def _take(self, entries: list[QueueEntry]) -> None:
        """Buffer the admissible first deliveries; a drop frees its task's slot, so admit a replacement
        now (the step still gets ``prompts_per_step`` groups)."""
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

    # ------------------------------------------------------------------ records

    def record(
        self, step: int, groups: list[ResponseGroup], metrics: dict, lags: list[int], phases: dict
    ) -> dict:
        rewards = [r for g in groups for r in (g.rewards or ())]
        lengths = [r.token_ids.size for g in groups for r in g.rollouts]
        record = {
            "step": step,
            "version": self.version,
            "groups": len(groups),
            "reward_mean": sum(rewards) / len(rewards),
            "response_length_mean": sum(lengths) / len(lengths),
            "lag_histogram": {str(k): v for k, v in sorted(Counter(lags).items())},
            "length_histogram": length_histogram(groups),
            "dropped": dict(self.intake.drops.by_reason),
            "dropped_length_histogram": {str(k): v for k, v in sorted(self.intake.drops.length_hist.items())},
            "dropped_reward_histogram": {str(k): v for k, v in sorted(self.intake.drops.reward_hist.items())},
            "queue": self.queue_depths(),
            "generator_idle_s": self.generator_idle(),
            "learner_idle_s": round(phases.get("collect", 0.0), 4),
            "phase_s": {k: round(v, 4) for k, v in phases.items()},
            "step_s": round(sum(phases.values()), 4),
            **metrics,
        }
        self.rundir.log_step(record)
        self.exporter.step(record, lags, self.published_bytes)
        return record

    def generator_idle(self) -> float:
        """Seconds the generators spent waiting (for tasks or weights) since the previous step. A generator
        that does not answer within 5 s (restarting) is left out; a restarted one counts from 0 again."""
        import ray

        delta = 0.0
        refs = [g.stats.remote() for g in self.rt.generators]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=5.0)
        for i, ref in enumerate(refs):
            if ref not in ready:
                continue
            try:
                idle = ray.get(ref)["idle_s"]
            except ray.exceptions.RayError:  # died between the wait and the get: no reading this step
                continue
            before = self._gen_idle.get(i, 0.0)
            delta += idle - before if idle >= before else idle
            self._gen_idle[i] = idle
        return round(delta, 4)

    def queue_depths(self) -> dict[str, int]:
        """Backlog and in-flight entries per stream (for the async-health view)."""
        out = {}
        for stream in ("tasks", "rollouts", "groups"):
            out[f"{stream}_pending"] = self.queue.pending_count(stream)
            out[f"{stream}_length"] = self.queue.length(stream)
        out["buffered"] = len(self.buffer)
        return out

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

    def finish(self, wall_s: float) -> dict[str, Any]:
        import ray

        ray.get([g.stop.remote() for g in self.rt.generators + self.rt.verifiers])
        self.rt.learner.save_hf(str(self.rundir.checkpoints / f"step-{self.cfg.coordinator.steps}"))

        def brief(e: dict[str, Any]) -> dict[str, Any]:
            sets = {name: {"pass_at": v["pass_at"], "report": v["report"]} for name, v in e["sets"].items()}
            return {"pass_at_1": e["pass_at_1"], "pass_at_k": e["pass_at_k"], "k": e["k"], "sets": sets}

        ledger = self.ledger.report()
        self.rundir.write_json("ledger.json", {"report": ledger.as_dict(), "tasks": self.ledger.states()})
        summary = {
            "lost": ledger.lost,
            "duplicates": ledger.duplicates,
            "ledger": ledger.as_dict(),
            "steps": self.cfg.coordinator.steps,
            "wall_seconds": round(wall_s, 2),
            "loop_seconds": round(self.loop_seconds, 2),
            "trained_groups": ledger.trained,
            "resumes": self.rundir.read("resumes.jsonl"),
            "replays": self.rundir.read("replays.jsonl"),
            "dropped_groups": self.intake.drops.total,
            "dropped_by_reason": dict(self.intake.drops.by_reason),
            "final_version": self.version,
            "final_sha256": self.intake.history[self.version],
            "initial_eval": brief(self.evals[0]),
            "final_eval": brief(self.evals[-1]),
        }
        self.rundir.write_summary(summary)
        self.rundir.plot_curves()
        return summary


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

    def update(step: int, record: dict, pass1: float) -> None:
        bar.set_postfix(
            reward=f"{record['reward_mean']:.3f}", pass1=f"{pass1:.3f}", step_s=f"{record['step_s']:.2f}"
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
        i["pass_at_1"],
        f["pass_at_1"],
        f["k"],
        i["pass_at_k"],
        f["pass_at_k"],
        summary["wall_seconds"],
    )
    return summary


def _change(before: dict[str, float], after: dict[str, float]) -> str:
    return ", ".join(f"Pass@{k} {before[k]:.3f} -> {after[k]:.3f}" for k in after)
