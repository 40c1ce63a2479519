"""Verifier throughput on this machine: sandboxed executions/s and p50/p99 latency per backend, against a
bare ``subprocess`` running the same program; plus math-verify checks/s through the killable pool and a
full code item (harness + 4 tests) per backend.

Each execution runs ``python3 -c 'print(sum(range(1000)))'``-sized work, so the numbers measure the
sandbox's own cost (namespaces, mounts, cgroups, process start). ``--concurrency`` runs that many
executions at once from a thread pool, as the REST service does with its slots.
Writes bench/results/verifier_throughput.json and prints a table.
Usage: python bench/verifier_throughput.py [--runs 40] [--concurrency 2] [--math 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from common import REPO, write_result

sys.path.insert(0, str(REPO))  # run as `python bench/verifier_throughput.py` from anywhere

from services.verifier.rules.code import CodeScorer, CodeSettings  # noqa: E402
from services.verifier.rules.math import MathScorer  # noqa: E402
from services.verifier.sandbox import ExecRequest, Limits, build_backend, probe_all  # noqa: E402

PYTHON = "/usr/bin/python3"
PROGRAM = "print(sum(range(1000)))"
CODE_ITEM = (
    "```python\ndef add(a, b):\n    return a + b\nif __name__ == '__main__':\n"
    "    print(add(*map(int, input().split())))\n```"
)
CODE_TESTS = [
    {"stdin": "1 2", "expected_stdout": "3"},
    {"stdin": "5 5", "expected_stdout": "10"},
    {"assert": "assert add(2, 2) == 4"},
    {"assert": "assert add(-1, 1) == 0"},
]
MATH_CASES = [
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2"),
    ("\\boxed{3}", "4"),
    ("\\boxed{\\sqrt{2}}", "\\sqrt{2}"),
]


def _stats(latencies: list[float], wall: float) -> dict[str, float]:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {
        "runs": len(ordered),
        "per_s": round(len(ordered) / wall, 2),
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p99_ms": round(p99 * 1000, 1),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 1),
    }


def _measure(fn: Callable[[], None], runs: int, concurrency: int) -> dict[str, float]:
    fn()  # warm caches (page cache, first cgroup) outside the measurement

    def timed(_: int) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(timed, range(runs)))
    return _stats(latencies, time.perf_counter() - start)


def bare_subprocess() -> None:
    out = subprocess.run([PYTHON, "-c", PROGRAM], capture_output=True, check=True)
    assert out.stdout.strip() == b"499500"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="executions per backend")
    parser.add_argument("--concurrency", type=int, default=2, help="executions at once")
    parser.add_argument("--code-items", type=int, default=10, help="full code items per backend")
    parser.add_argument("--math", type=int, default=200, help="math-verify checks")
    args = parser.parse_args()

    probes = probe_all(python=PYTHON)
    rows: dict[str, dict] = {"subprocess": _measure(bare_subprocess, args.runs, args.concurrency)}
    code_items: dict[str, dict] = {}
    for name, probe in probes.items():
        if not probe.available:
            rows[name] = {"available": False, "detail": probe.detail}
            continue
        box = build_backend(name)
        request = ExecRequest((PYTHON, "-c", PROGRAM), limits=Limits(wall_s=30))

        def run_one(box=box, request=request) -> None:  # default binds this backend
            result = box.run(request)
            assert result.status == "ok" and result.stdout.strip() == b"499500", result

        rows[name] = _measure(run_one, args.runs, args.concurrency)
        scorer = CodeScorer()
        scorer.configure(box, CodeSettings(wall_s=30, allow_unsandboxed=True))

        def score_one(scorer=scorer) -> None:  # default binds this backend
            verdict = scorer(CODE_ITEM, {"tests": CODE_TESTS})
            assert verdict.status == "pass", verdict

        code_items[name] = _measure(score_one, args.code_items, args.concurrency)
        box.close()

    math = MathScorer(workers=max(1, args.concurrency), timeout_s=5.0)
    math.pool()  # start (and warm) the workers outside the measurement
    cases = [MATH_CASES[i % len(MATH_CASES)] for i in range(args.math)]
    it = iter(cases)

    def check_one() -> None:
        response, gold = next(it)
        assert math(response, {"answer": gold}).status in ("pass", "fail")

    math_row = _measure(check_one, args.math - 1, args.concurrency)
    math.close()

    payload = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "euid": os.geteuid()},
        "load_avg_1m_at_end": os.getloadavg()[0],
        "settings": vars(args),
        "executions": rows,
        "code_item_4_tests": code_items,
        "math_verify": math_row,
        "probe": {name: probe.as_dict() for name, probe in probes.items()},
    }
    out = write_result("verifier_throughput", payload)
    print(f"{'what':<26} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for label, table in (("exec", rows), ("code item", code_items)):
        for name, row in table.items():
            if "per_s" in row:
                print(f"{label + ' ' + name:<26} {row['per_s']:>8} {row['p50_ms']:>8} {row['p99_ms']:>8}")
            else:
                print(f"{label + ' ' + name:<26} unavailable: {row['detail']}")
    print(f"{'math-verify check':<26} {math_row['per_s']:>8} {math_row['p50_ms']:>8} {math_row['p99_ms']:>8}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
