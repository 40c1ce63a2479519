"""Soak: the tiny config in async mode for a long time, with faults on a schedule, every resource of the run
sampled as it goes.

The run (``configs/countdown-tiny.yaml``, ``max_policy_lag`` 1, one core each for generator and learner) uses
a Redis this script starts (AOF on, as deploy/ recommends) so that Redis can be restarted under it. Every
``--fault-every-s`` seconds one fault, in turn: SIGKILL the generator actor, SIGKILL the verifier actor,
restart Redis; once, near the middle, SIGKILL the coordinator itself and continue the run with
``--resume`` (which also sets the step count that ends the run at ``--minutes``). Every ``--sample-s``
seconds: the RSS and open file descriptors of every process the run started (they all inherit a marker in
their environment), Redis ``used_memory``, the AOF and run-directory sizes, the learner's step times, and
whether the learner's gauge (``ray_lpo_learner_weights_version``) is on the Ray metrics endpoint that
Prometheus would scrape.

The verdicts: for each resource, the least-squares slope per hour after the warm-up and the ratio of its
mean over the last window to its mean over the first window after the warm-up (warm-up and windows are a
sixth of the run: 10 minutes each for 60); the step-time median of those two windows; 0 lost and 0
duplicates in the ledger; the gaps in the learner's gauge (samples where it was missing between its first
and last appearance under one coordinator);
after each fault and at the end, the run's processes left over (zombies counted too).

    python bench/soak.py --minutes 60                  # the committed record: bench/results/soak.json, .png
    python bench/soak.py --minutes 3 --results-dir D   # the CI version (tests/e2e/test_soak_smoke.py)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

from common import ASYNC_CORES, REPO, RESULTS

from services.common.redis_server import EmbeddedRedis, free_port
from services.coordinator.reaper import marked

MARK = "LPO_SOAK_MARKER"
GAUGE = "ray_lpo_learner_weights_version"
KINDS = (  # (kind, what its command line starts with or holds), first match wins
    ("generator", "ray::GeneratorActor"),
    ("verifier", "ray::VerifierActor"),
    ("learner", "ray::LearnerRank"),
    ("ray-agents", "ray::DashboardAgent"),
    ("ray-agents", "ray::RuntimeEnvAgent"),
    ("ray-workers", "ray::"),  # idle workers Ray keeps ready
    ("redis", "redis-server"),
    ("watcher", "services.coordinator.reaper"),
    ("coordinator", "services.coordinator"),
    ("ray-core", "site-packages/ray/"),  # gcs_server, raylet, dashboard, log monitor, autoscaler monitor
)


# ---------------------------------------------------------------------------------------------- processes


def _marked(marker: str) -> list[int]:
    """The run's processes (zombies too): the marker in their environment, or a marked ancestor."""
    return marked(marker, var=MARK, zombies=True)


def _proc_info(pid: int) -> dict | None:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        status = Path(f"/proc/{pid}/status").read_text()
        rss_kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        fds = len(os.listdir(f"/proc/{pid}/fd")) if state != "Z" else 0
    except (OSError, ValueError):
        return None
    kind = next(
        (k for k, pat in KINDS if cmd.startswith(pat) or (not pat.startswith("ray::") and pat in cmd)),
        "other",
    )
    return {"pid": pid, "kind": kind, "zombie": state == "Z", "rss_mb": rss_kb / 1024, "fds": fds}


def _processes(marker: str, also: tuple[int | None, ...] = ()) -> list[dict]:
    """The marked processes, and ``also`` (Redis rewrites its process title over the memory that
    /proc/<pid>/environ shows, so its marker cannot be read: the soak knows its PID)."""
    pids = set(_marked(marker)) | {p for p in also if p is not None}
    return [p for p in (_proc_info(pid) for pid in sorted(pids)) if p is not None]


def _dir_bytes(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file():
                total += p.stat().st_size
    return total


def _gauge_present(port: int | None) -> bool | None:
    if port is None:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as resp:
            return any(line.startswith(GAUGE) for line in resp.read().decode(errors="replace").splitlines())
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------ the soak


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work, self.marker = args, work, uuid.uuid4().hex
        self.duration = args.minutes * 60.0
        self.run_dir = work / "runs" / "soak"
        self.samples: list[dict] = []
        self.faults: list[dict] = []
        self.lock = threading.Lock()
        self.stop_sampling = threading.Event()
        self.coordinator_up = threading.Event()
        self.t0 = time.monotonic()
        os.environ[MARK] = self.marker  # inherited by Redis, the coordinator and everything Ray starts
        self.redis = EmbeddedRedis(appendonly=True, data_dir=work / "redis").start()
        self.proc: subprocess.Popen | None = None
        self.log = work / "coordinator.log"
        self.metrics_port = free_port()  # the embedded Ray's Prometheus endpoint, kept across the resume

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    # ------------------------------------------------------------------ the run

    def _coordinator(self, args: list[str]) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.coordinator", *args],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def start(self) -> None:
        steps = int(self.duration / 0.2) + 100  # more than can run: the resume sets the real end
        sets = [
            "--config", "configs/countdown-tiny.yaml",
            "--set", "coordinator.max_policy_lag=1", *[x for o in ASYNC_CORES for x in ("--set", o)],
            "--set", f"coordinator.steps={steps}", "--set", "coordinator.eval_every=0",
            "--set", "coordinator.eval_problems=16", "--set", "coordinator.eval_samples=1",
            "--set", "coordinator.eval_k=1",
            "--set", f"learner.checkpoint_every={self.args.checkpoint_every}",
            "--set", f"queue.redis_url={self.redis.url}", "--set", "queue.claim_idle_ms=3000",
            "--set", f"metrics.export_port={self.metrics_port}",
            "--set", f"coordinator.runs_dir={self.run_dir.parent}",
            "--set", f"coordinator.run_name={self.run_dir.name}",
        ]  # fmt: skip
        self._coordinator(sets)

    def steps(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    def wait_steps(self, n: int, timeout_s: float = 900) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.steps()) < n:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the run ended ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no step {n} within {timeout_s:.0f}s")
            time.sleep(0.2)

    # ------------------------------------------------------------------ sampling

    def sampler(self) -> None:
        seen_steps = 0
        while not self.stop_sampling.is_set():
            procs = _processes(self.marker, (self.redis.pid,))
            used = None
            with contextlib.suppress(Exception):
                import redis

                used = int(
                    redis.Redis.from_url(self.redis.url, socket_timeout=2).info("memory")["used_memory"]
                )
            steps = self.steps()
            new = steps[seen_steps:]
            seen_steps = len(steps)
            up = self.coordinator_up.is_set()
            sample = {
                "t": self.now(),
                "rss_mb": {},
                "fds": sum(p["fds"] for p in procs),
                "processes": {},
                "zombies": sum(p["zombie"] for p in procs),
                "redis_used_mb": None if used is None else round(used / 2**20, 3),
                "aof_mb": round(_dir_bytes(self.work / "redis") / 2**20, 3),
                "run_dir_mb": round(_dir_bytes(self.run_dir) / 2**20, 3) if self.run_dir.exists() else 0.0,
                "steps": seen_steps,
                "step_s": [round(s["step_s"], 4) for s in new],
                "coordinator_up": up,
                "learner_gauge": _gauge_present(self.metrics_port) if up else None,
            }
            for p in procs:
                sample["rss_mb"][p["kind"]] = round(sample["rss_mb"].get(p["kind"], 0.0) + p["rss_mb"], 2)
                sample["processes"][p["kind"]] = sample["processes"].get(p["kind"], 0) + 1
            sample["rss_mb"]["total"] = round(sum(p["rss_mb"] for p in procs), 2)
            with self.lock:
                self.samples.append(sample)
            self.stop_sampling.wait(self.args.sample_s)

    # ------------------------------------------------------------------ faults

    def _actor(self, kind: str) -> list[int]:
        return [
            p["pid"]
            for p in _processes(self.marker, (self.redis.pid,))
            if p["kind"] == kind and not p["zombie"]
        ]

    def _recovered_steps(self, after: int, timeout_s: float = 600) -> float:
        """Seconds until the run logs a step past ``after``."""
        started = time.monotonic()
        self.wait_steps(after + 1, timeout_s)
        return round(time.monotonic() - started, 2)

    def fault(self, kind: str) -> dict:
        at, step = self.now(), len(self.steps())
        record: dict = {"kind": kind, "t": at, "step": step}
        if kind in ("generator", "verifier"):
            [victim] = self._actor(kind)
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 300
            while not [p for p in self._actor(kind) if p != victim]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no new {kind} process within 300 s")
                time.sleep(0.2)
            record["recovered_s"] = self._recovered_steps(len(self.steps()))
            record["old_process_left"] = victim in _marked(self.marker)
        elif kind == "redis":
            self.redis.restart()
            record["recovered_s"] = self._recovered_steps(len(self.steps()))
        else:  # the coordinator, then --resume with the step count that ends the run on time
            assert self.proc is not None
            self.coordinator_up.clear()
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            deadline = time.monotonic() + 30  # its watcher stops the embedded Ray's processes
            while self._left_without_coordinator() and time.monotonic() < deadline:
                time.sleep(0.5)
            record["left_after_kill"] = self._left_without_coordinator()
            done = self.steps()
            rate = statistics.median(s["step_s"] for s in done[-50:]) if done else 1.0
            remaining = max(self.duration - self.now(), 0.0)
            end = len(done) + max(int(remaining / rate), self.args.checkpoint_every + 5)
            record["steps_set"] = end
            self._coordinator(["--resume", str(self.run_dir), "--set", f"coordinator.steps={end}"])
            record["recovered_s"] = self._recovered_steps(len(done))
            self.coordinator_up.set()
        record["processes_after"] = {
            k: sum(1 for p in _processes(self.marker, (self.redis.pid,)) if p["kind"] == k)
            for k in ("generator", "verifier", "learner")
        }
        return record

    def _left_without_coordinator(self) -> list[str]:
        """Processes of the run other than its Redis, while no coordinator runs (should be none)."""
        return sorted(p["kind"] for p in _processes(self.marker, (self.redis.pid,)) if p["kind"] != "redis")

    def schedule(self, first_step_t: float) -> list[tuple[float, str]]:
        every = self.args.fault_every_s or self.duration / 12
        times = []
        t = first_step_t + every
        while t < self.duration - every / 2:
            times.append(t)
            t += every
        cycle = ("generator", "verifier", "redis")
        plan = [(t, cycle[i % 3]) for i, t in enumerate(times)]
        # the coordinator kill replaces the fault nearest the middle, after one of each other kind
        if len(plan) > 3:
            mid = min(range(3, len(plan)), key=lambda i: abs(plan[i][0] - self.duration / 2))
            plan[mid] = (plan[mid][0], "coordinator")
        elif plan:
            plan.append((plan[-1][0] + every, "coordinator"))
        return plan

    # ------------------------------------------------------------------ main

    def run(self) -> dict:
        self.start()
        sampler = threading.Thread(target=self.sampler, daemon=True)
        sampler.start()
        try:
            self.wait_steps(1)
            self.coordinator_up.set()  # stepping: from here on the learner's gauge must be exported
            for at, kind in self.schedule(self.now()):
                while self.now() < at:
                    if self.proc is not None and self.proc.poll() is not None:
                        break
                    time.sleep(0.5)
                if self.proc is not None and self.proc.poll() is not None:
                    break
                self.faults.append(self.fault(kind))
                print(f"[soak {self.now():7.1f}s] {json.dumps(self.faults[-1])}", flush=True)
            assert self.proc is not None
            rc = self.proc.wait(timeout=self.duration + 1800)
            self.coordinator_up.clear()
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.stop_sampling.set()
            sampler.join()
            self.redis.stop()
        deadline = time.monotonic() + 30
        while _marked(self.marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [p["kind"] for p in _processes(self.marker, (self.redis.pid,))]
        summary_path = self.run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        return {
            "returncode": rc,
            "minutes": self.args.minutes,
            "sample_s": self.args.sample_s,
            "faults": self.faults,
            "left_at_end": left,
            "ledger": summary.get("ledger"),
            "lost": summary.get("lost"),
            "duplicates": summary.get("duplicates"),
            "steps": summary.get("steps"),
            "samples": self.samples,
        }


# ---------------------------------------------------------------------------------------------- analysis


def _slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 3:
        return None
    mt = statistics.fmean(t for t, _ in points)
    mv = statistics.fmean(v for _, v in points)
    den = sum((t - mt) ** 2 for t, _ in points)
    return None if den == 0 else sum((t - mt) * (v - mv) for t, v in points) / den * 3600.0


def analyse(result: dict) -> dict:
    samples = [s for s in result["samples"] if s["steps"] > 0]
    if not samples:
        return {"error": "no step was sampled"}
    start, end = samples[0]["t"], samples[-1]["t"]
    window = (end - start) / 6
    warm = start + window
    first = (warm, warm + window)
    last = (end - window, end)
    series = {
        "rss_total_mb": lambda s: s["rss_mb"].get("total"),
        **{f"rss_{k}_mb": (lambda s, k=k: s["rss_mb"].get(k)) for k in ("generator", "verifier", "learner",
                                                                         "coordinator", "redis", "ray-core",
                                                                         "ray-agents")},
        "fds": lambda s: s["fds"],
        "redis_used_mb": lambda s: s["redis_used_mb"],
        "aof_mb": lambda s: s["aof_mb"],
        "run_dir_mb": lambda s: s["run_dir_mb"],
    }  # fmt: skip
    out: dict = {"warm_up_s": round(warm - start, 1), "window_s": round(window, 1), "resources": {}}
    for name, get in series.items():
        pts = [(s["t"], get(s)) for s in samples if s["t"] >= warm and get(s) is not None]
        a = [v for t, v in pts if first[0] <= t < first[1]]
        b = [v for t, v in pts if last[0] <= t <= last[1]]
        ratio = statistics.fmean(b) / statistics.fmean(a) if a and b and statistics.fmean(a) else None
        slope = _slope_per_hour(pts)
        out["resources"][name] = {
            "slope_per_hour": None if slope is None else round(slope, 3),
            "last_over_first_window": None if ratio is None else round(ratio, 3),
        }
    step_times = {"first": [], "last": []}
    for s in samples:
        for key, (lo, hi) in (("first", first), ("last", last)):
            if lo <= s["t"] <= hi:
                step_times[key] += s["step_s"]
    med = {k: statistics.median(v) if v else None for k, v in step_times.items()}
    out["step_s_median"] = {k: None if v is None else round(v, 4) for k, v in med.items()}
    out["step_s_last_over_first"] = (
        round(med["last"] / med["first"], 3) if med["first"] and med["last"] else None
    )
    # The gauge appears one Ray report interval after the learner first sets it and goes with the run, so
    # a gap is a missing sample between the first and the last present one of a coordinator's lifetime.
    segments, current = [], []
    for sample in result["samples"]:
        if sample["learner_gauge"] is None:
            if current:
                segments.append(current)
            current = []
        else:
            current.append(sample["learner_gauge"])
    if current:
        segments.append(current)
    gaps = 0
    for seg in segments:
        present = [i for i, v in enumerate(seg) if v]
        if present:
            gaps += sum(1 for v in seg[present[0] : present[-1] + 1] if not v)
    out["learner_gauge_samples"] = sum(len(seg) for seg in segments)
    out["learner_gauge_present"] = sum(sum(seg) for seg in segments)
    out["learner_gauge_gaps"] = gaps
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    t = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    for kind in (
        "total",
        "generator",
        "learner",
        "verifier",
        "coordinator",
        "redis",
        "ray-core",
        "ray-agents",
    ):
        axes[0].plot(t, [s["rss_mb"].get(kind, math.nan) for s in samples], label=kind)
    axes[0].set_ylabel("RSS (MiB)")
    axes[0].legend(fontsize=7, ncol=4)
    axes[1].plot(t, [s["redis_used_mb"] if s["redis_used_mb"] is not None else math.nan for s in samples],
                 label="Redis used_memory")  # fmt: skip
    axes[1].plot(t, [s["aof_mb"] for s in samples], label="AOF")
    axes[1].plot(t, [s["run_dir_mb"] for s in samples], label="run directory")
    axes[1].set_ylabel("MiB")
    axes[1].legend(fontsize=7)
    axes[2].plot(t, [s["fds"] for s in samples], label="open fds (all processes)")
    axes[2].set_ylabel("fds")
    xs, ys = [], []
    for s in samples:
        for v in s["step_s"]:
            xs.append(s["t"] / 60)
            ys.append(v)
    axes[3].plot(xs, ys, ".", markersize=2)
    axes[3].set_ylabel("step seconds")
    axes[3].set_xlabel("minutes")
    for f in result["faults"]:
        for ax in axes:
            ax.axvline(f["t"] / 60, color="grey", alpha=0.4, linewidth=0.8)
        axes[0].annotate(
            f["kind"][:3], (f["t"] / 60, axes[0].get_ylim()[1]), fontsize=6, rotation=90, va="top"
        )
    fig.suptitle(f"soak: {result['minutes']} min, async tiny config, {len(result['faults'])} faults")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--fault-every-s", type=float, default=None, help="default: a twelfth of the run")
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default="soak")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lpo-soak-") as tmp:
        result = Soak(args, Path(tmp)).run()
    result["analysis"] = analyse(result)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"{args.name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
