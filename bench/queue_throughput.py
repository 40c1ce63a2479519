"""Queue cost: scored groups per second through the three streams (tasks -> rollouts -> groups) with
realistic group sizes, against the ``redis-benchmark`` XADD ceiling of the same payload on the same
server, and the queue's share of a learner step.

One process plays every stage, in batches of ``--batch`` (a step's prompts): admit the tasks in one
transaction, a generator reads them and forwards K-response groups (token ids + behaviour log-probs)
atomically with its acks, a verifier reads those and forwards scored groups, the learner reads and acks.
So each group costs three XADDs, three reads and three XACKs; ``redis-benchmark`` measures one XADD of
the same bytes with 4 clients, the server's ceiling for the biggest of those writes.

    python bench/queue_throughput.py [--groups 2000]

writes ``bench/results/queue_throughput.json``. The step time for the share comes from the last
``make run`` (``runs/countdown-tiny/metrics.jsonl``) when present.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import time

from common import REPO, read_jsonl, write_result

SHAPES = {"tiny (K=8, 48 tokens)": (8, 48), "countdown paper (K=8, 1024 tokens)": (8, 1024)}


def _pipeline(url: str, run: str, k: int, tokens: int, n_groups: int, batch: int) -> dict:
    import numpy as np

    from services.common.messages import ResponseGroup, Rollout, RolloutTask, encode
    from services.common.queue import StreamQueue

    stages = {name: StreamQueue(url, run) for name in ("coordinator", "generator", "verifier", "learner")}
    stages["coordinator"].ensure_groups()
    rng = np.random.default_rng(0)
    sha = "0" * 64

    def rollout() -> Rollout:
        ids = rng.integers(0, 150_000, tokens).tolist()
        return Rollout(ids, (-rng.random(tokens)).tolist(), "length")

    done, payload_bytes = 0, 0
    started = time.perf_counter()
    while done < n_groups:
        tasks = [
            RolloutTask(
                f"t{done + i}", list(range(64)), "p" * 200, "countdown", {"nums": [1, 2], "target": 3}, k
            )
            for i in range(batch)
        ]
        stages["coordinator"].put_many("tasks", tasks)
        read = stages["generator"].read("tasks", "gen", count=batch, block_ms=0)
        sampled = [ResponseGroup(e.message, tuple(rollout() for _ in range(k)), 0, sha) for e in read]
        stages["generator"].forward("tasks", [e.entry_id for e in read], "rollouts", sampled)
        read = stages["verifier"].read("rollouts", "ver", count=batch, block_ms=0)
        scored = [e.message.with_rewards((1.0,) * k, ("pass",) * k) for e in read]
        stages["verifier"].forward("rollouts", [e.entry_id for e in read], "groups", scored)
        read = stages["learner"].read("groups", "learner", count=batch, block_ms=0)
        stages["learner"].ack("groups", [e.entry_id for e in read])
        payload_bytes = len(encode(scored[0]))
        done += len(read)
    seconds = time.perf_counter() - started
    for q in stages.values():
        q.close()
    return {
        "groups": done,
        "seconds": round(seconds, 3),
        "groups_per_s": round(done / seconds, 1),
        "group_bytes": payload_bytes,
    }


def _xadd_ceiling(port: int, nbytes: int, n: int) -> float:
    """``redis-benchmark``'s XADD requests/s with a ``nbytes`` field, 4 clients, no pipelining."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise SystemExit("redis-benchmark not found: apt-get install redis-tools (or redis-server)")
    cmd = [
        binary,
        "-p",
        str(port),
        "-n",
        str(n),
        "-c",
        "4",
        "--csv",
        "XADD",
        "benchstream",
        "*",
        "m",
        "x" * nbytes,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    last = [line for line in out.splitlines() if line.startswith('"XADD')][-1]
    return float(last.split(",")[1].strip('"'))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    from services.common.redis_server import EmbeddedRedis

    step_s = None
    metrics = REPO / "runs" / "countdown-tiny" / "metrics.jsonl"
    if metrics.exists():
        step_s = statistics.mean(r["step_s"] for r in read_jsonl(metrics))
    rows = []
    with EmbeddedRedis() as server:
        for i, (label, (k, tokens)) in enumerate(SHAPES.items()):
            n = args.groups if tokens <= 64 else max(200, args.groups // 4)
            row = {"shape": label, **_pipeline(server.url, f"qbench{i}", k, tokens, n, args.batch)}
            ceiling = _xadd_ceiling(server.port, row["group_bytes"], n=max(2000, n))
            # Three XADDs per group (tasks, rollouts, groups); the rollouts and groups entries are full size.
            row |= {
                "redis_benchmark_xadd_per_s": round(ceiling, 1),
                "groups_per_s_vs_xadd_ceiling": round(row["groups_per_s"] / ceiling, 3),
            }
            if step_s is not None:
                queue_s = args.batch / row["groups_per_s"]
                row |= {
                    "queue_s_per_step": round(queue_s, 4),
                    "share_of_make_run_step": round(queue_s / step_s, 4),
                }
            rows.append(row)
            print(json.dumps(row))
    out = write_result(
        "queue_throughput",
        {"batch": args.batch, "make_run_mean_step_s": step_s, "device": "cpu, loopback Redis", "rows": rows},
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
