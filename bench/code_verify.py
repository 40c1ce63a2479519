"""Does the verify phase of a code run keep up, and does ``verifier.num_workers`` scale it?

One step's worth of the tiny code task's responses (default 16 groups x 8 = 128 programs, each run against
its 5 stdin/stdout tests) is put on a run's ``:rollouts`` stream in a private Redis, and N verifier
workers (separate processes, each a ``VerifierWorker`` with its own sandbox, as N verifier actors are)
drain it into ``:groups``. The wall time from the first read to the last forwarded group is the verify
phase of a step; it is measured for each N in ``--workers``, in one run, with the machine's load average
at the start and the end (a loaded machine slows every N: compare within one run).

The programs are what a partly trained model writes: per group, the reference program of the problem,
programs with one step changed (partial credit: they pass the tests that step does not affect), programs
with a step dropped and programs that do not compile, in fixed proportions (seeded).
Writes bench/results/code_verify.json and .png.
Usage: python bench/code_verify.py [--groups 16] [--workers 1 2] [--sandbox zygote] [--results-dir D]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import time
from pathlib import Path

from common import RESULTS

from services.common.config import VerifierConfig
from services.common.data.tinycode import STEP_NAMES, generate, solution_of
from services.common.messages import ResponseGroup, Rollout, RolloutTask
from services.common.queue import StreamQueue
from services.common.redis_server import EmbeddedRedis

K = 8
SHA = "0" * 64


def _responses(steps: tuple[str, ...], final: str, rng: random.Random) -> list[str]:
    """K programs for one problem: 3 right, 2 with a step replaced, 2 with a step dropped, 1 broken."""
    right = solution_of(steps, final)
    out = [right] * 3
    for _ in range(2):
        changed = list(steps)
        changed[rng.randrange(len(changed))] = rng.choice([s for s in STEP_NAMES if s not in "+-<>"])
        out.append(solution_of(tuple(changed), final))
    for _ in range(2):
        out.append(solution_of(steps[1:], final))
    out.append(right.replace("print(", "print((", 1))  # unbalanced: does not compile
    return out


def groups(n: int, seed: int = 0) -> list[ResponseGroup]:
    rng = random.Random(seed)
    out = []
    for i, (steps, final, problem) in enumerate(generate(n, seed=seed + 100)):
        task = RolloutTask(f"t{i}", [1], problem.prompt, "code", problem.reference(), K)
        rollouts = tuple(Rollout([7], [-0.5], "stop", text=t) for t in _responses(steps, final, rng))
        out.append(ResponseGroup(task, rollouts, 0, SHA))
    return out


def _worker(url: str, run: str, index: int, sandbox: str, ready, go, done) -> None:
    from services.verifier.rules import configure_rules
    from services.verifier.sandbox.probe import select_sandbox
    from services.verifier.worker import VerifierWorker

    cfg = VerifierConfig(sandbox=sandbox)
    box, _ = select_sandbox(cfg.sandbox, fallback=False, python=cfg.python)
    configure_rules(cfg, box)
    worker = VerifierWorker(StreamQueue(url, run), consumer=f"verifier-{index}", batch=1)
    ready.set()
    go.wait()
    while not done.is_set():
        worker.step(block_ms=50)


def measure(url: str, n_workers: int, batch: list[ResponseGroup], sandbox: str) -> dict:
    run = f"bench-{n_workers}-{time.monotonic_ns()}"
    queue = StreamQueue(url, run)
    queue.ensure_groups()
    ctx = mp.get_context("spawn")
    go, done = ctx.Event(), ctx.Event()
    readies = [ctx.Event() for _ in range(n_workers)]
    procs = [
        ctx.Process(target=_worker, args=(url, run, i, sandbox, readies[i], go, done), daemon=True)
        for i in range(n_workers)
    ]
    for p in procs:
        p.start()
    for r in readies:
        if not r.wait(120):
            raise RuntimeError("a verifier worker did not start within 120 s")
    queue.put_many("rollouts", batch)
    started = time.perf_counter()
    go.set()
    scored = []
    while len(scored) < len(batch):
        entries = queue.read("groups", "learner", count=len(batch), block_ms=20)
        scored += [e.message for e in entries or ()]
    wall = time.perf_counter() - started
    done.set()
    for p in procs:
        p.join(30)
    responses = sum(len(g.rollouts) for g in scored)
    verdicts = [v for g in scored for v in g.verdicts or ()]
    return {
        "workers": n_workers,
        "wall_s": round(wall, 3),
        "responses_per_s": round(responses / wall, 1),
        "verdicts": {s: verdicts.count(s) for s in sorted(set(verdicts))},
        "mean_reward": round(sum(r for g in scored for r in g.rewards or ()) / responses, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sandbox", default="zygote")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    batch = groups(args.groups)
    load = [os.getloadavg()[0]]
    with EmbeddedRedis() as redis:
        rows = [measure(redis.url, n, batch, args.sandbox) for n in args.workers]
    load.append(os.getloadavg()[0])
    base = rows[0]["wall_s"]
    for r in rows:
        r["speedup"] = round(base / r["wall_s"], 2)
        print(f"{r['workers']} worker(s): {r['wall_s']:.2f} s for {args.groups * K} programs "
              f"({r['responses_per_s']} /s, {r['speedup']}x) verdicts {r['verdicts']}")  # fmt: skip
    payload = {
        "groups": args.groups, "k": K, "tests_per_program": 5, "sandbox": args.sandbox,
        "cpus": os.cpu_count(), "load_avg_1m": {"start": round(load[0], 2), "end": round(load[1], 2)},
        "rows": rows,
    }  # fmt: skip
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / "code_verify.json"
    out.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    _plot(rows, out.with_suffix(".png"), args)


def _plot(rows: list[dict], path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar([str(r["workers"]) for r in rows], [r["wall_s"] for r in rows], color="#4c72b0")
    ax.set_xlabel("verifier workers")
    ax.set_ylabel(f"seconds to verify {args.groups * K} programs")
    ax.set_title(f"Verify phase of one code step ({args.sandbox})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
