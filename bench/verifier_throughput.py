"""Verifier throughput on this machine, every execution path in one run.

* Trivial executions (``python3 -c 'print(sum(range(1000)))'``): executions/s and p50/p99 latency for the
  fast path (``zygote``), ``nsjail``, ``bwrap``, ``none`` and a bare ``subprocess`` (no sandbox at all).
* A 4-test code item (2 stdin/stdout + 2 assert tests) through the code rule: items/s and p50/p99 per path.
* The REST service (started here on loopback, one uvicorn process, default slots): ``POST /run_code``
  executions/s and ``POST /v1/verify`` (one 4-test item per request) items/s at client concurrency 1, 2,
  4 and 8, each client a keep-alive ``httpx.Client``.
* math-verify checks/s through the killable pool.

``--concurrency`` executions run at once from a thread pool for the direct measurements, as the service
does with its slots; every path gets the same settings and the machine's load average is recorded at
the start and the end (a loaded machine makes every number smaller: compare paths within one run).
Writes bench/results/verifier_throughput.json and .png and prints a table.
Usage: python bench/verifier_throughput.py [--runs 300] [--items 60] [--requests 200] [--concurrency 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import REPO, RESULTS, write_result

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
HTTP_CONCURRENCY = (1, 2, 4, 8)


def _stats(latencies: list[float], wall: float) -> dict[str, float]:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {
        "runs": len(ordered),
        "per_s": round(len(ordered) / wall, 2),
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(p99 * 1000, 2),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2),
    }


def _measure(fn: Callable[[int], None], runs: int, concurrency: int) -> dict[str, float]:
    for i in range(min(5, runs)):
        fn(i)  # warm caches (page cache, first cgroup, the zygote's first fork) outside the measurement

    def timed(i: int) -> float:
        start = time.perf_counter()
        fn(i)
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(timed, range(runs)))
    return _stats(latencies, time.perf_counter() - start)


def bare_subprocess(_: int) -> None:
    out = subprocess.run([PYTHON, "-c", PROGRAM], capture_output=True, check=True)
    assert out.stdout.strip() == b"499500"


def measure_paths(args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """Executions and code items per sandbox path, plus the bare subprocess; and the probe results."""
    probes = probe_all(python=PYTHON)
    executions: dict[str, dict] = {"subprocess": _measure(bare_subprocess, args.runs, args.concurrency)}
    items: dict[str, dict] = {}
    for name, probe in probes.items():
        if not probe.available:
            executions[name] = items[name] = {"available": False, "detail": probe.detail}
            continue
        box = build_backend(name, python=PYTHON)
        request = ExecRequest((PYTHON, "-c", PROGRAM), limits=Limits(wall_s=30))

        def run_one(_: int, box=box, request=request) -> None:  # default binds this backend
            result = box.run(request)
            assert result.status == "ok" and result.stdout.strip() == b"499500", result

        executions[name] = _measure(run_one, args.runs, args.concurrency)
        scorer = CodeScorer()
        scorer.configure(box, CodeSettings(wall_s=30, allow_unsandboxed=True))

        def score_one(_: int, scorer=scorer) -> None:  # default binds this backend
            verdict = scorer(CODE_ITEM, {"tests": CODE_TESTS})
            assert verdict.status == "pass", verdict

        items[name] = _measure(score_one, args.items, args.concurrency)
        box.close()
    return executions, items, {name: probe.as_dict() for name, probe in probes.items()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(backend: str, port: int) -> None:
    """The service as ``python -m services.verifier serve`` runs it (no Redis: /v1/tasks is not measured),
    given the sandbox directly so that any probed backend can serve."""
    import uvicorn

    from services.common.config import VerifierConfig
    from services.verifier.app import create_app

    sandbox = build_backend(backend, python=PYTHON)
    try:
        uvicorn.run(
            create_app(VerifierConfig(), sandbox=sandbox), host="127.0.0.1", port=port, log_level="warning"
        )
    finally:
        sandbox.close()


def measure_http(backend: str, requests: int) -> dict[str, dict]:
    """/run_code and /v1/verify throughput at each client concurrency against a fresh service."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, __file__, "--serve", backend, "--port", str(port)]
    server = subprocess.Popen(cmd, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # wait for readiness by polling /healthz (the service probes its sandbox first)
            if server.poll() is not None:
                raise RuntimeError(f"the service exited with {server.returncode}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not become healthy in 120 s")
            time.sleep(0.2)
        run_code = {"code": PROGRAM, "language": "python", "run_timeout": 10}
        verify = {"items": [{"id": "a", "task": "code", "response": CODE_ITEM, "tests": CODE_TESTS}]}
        out: dict[str, dict] = {"run_code": {}, "verify_code_item": {}}
        local, clients = threading.local(), []

        def client() -> httpx.Client:  # one keep-alive client per pool thread
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=url, timeout=60)
                clients.append(local.client)
            return local.client

        def call_run_code(_: int) -> None:
            reply = client().post("/run_code", json=run_code).json()
            assert reply["status"] == "Success" and reply["run_result"]["stdout"] == "499500\n", reply

        def call_verify(_: int) -> None:
            reply = client().post("/v1/verify", json=verify).json()
            assert reply["results"][0]["status"] == "pass", reply

        for concurrency in HTTP_CONCURRENCY:
            out["run_code"][str(concurrency)] = _measure(call_run_code, requests, concurrency)
            out["verify_code_item"][str(concurrency)] = _measure(
                call_verify, max(requests // 2, 10), concurrency
            )
        for each in clients:
            each.close()
        return out
    finally:
        server.terminate()
        server.wait(timeout=30)


def measure_math(args: argparse.Namespace) -> dict[str, float]:
    math = MathScorer(workers=max(1, args.concurrency), timeout_s=5.0)
    math.pool()  # start (and warm) the workers outside the measurement
    try:

        def check_one(i: int) -> None:
            response, gold = MATH_CASES[i % len(MATH_CASES)]
            assert math(response, {"answer": gold}).status in ("pass", "fail")

        return _measure(check_one, args.math, args.concurrency)
    finally:
        math.close()


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, key, title in (
        (axes[0], "executions", "trivial executions / s"),
        (axes[1], "code_item_4_tests", "4-test code items / s"),
    ):
        rows = {k: v for k, v in payload[key].items() if "per_s" in v}
        bars = ax.bar(list(rows), [v["per_s"] for v in rows.values()], color="tab:blue")
        ax.bar_label(bars, [f"{v['per_s']:.0f}\np99 {v['p99_ms']:.0f} ms" for v in rows.values()], fontsize=8)
        ax.set_title(title)
        ax.margins(y=0.2)  # room for the labels
    http = payload.get("http", {})
    for label, rows in http.get("endpoints", {}).items():
        levels = sorted(rows, key=int)
        axes[2].plot([int(c) for c in levels], [rows[c]["per_s"] for c in levels], marker="o", label=label)
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("client concurrency")
    axes[2].set_title(f"REST ({http.get('backend', '?')}) requests / s")
    axes[2].legend()
    load = payload["load_avg_1m"]
    cpus = payload["machine"]["cpus"]
    fig.suptitle(f"verifier throughput, {cpus} CPUs, load {load['start']:.2f} -> {load['end']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300, help="trivial executions per path")
    parser.add_argument("--items", type=int, default=60, help="4-test code items per path")
    parser.add_argument("--requests", type=int, default=200, help="/run_code requests per concurrency")
    parser.add_argument("--concurrency", type=int, default=2, help="direct executions at once")
    parser.add_argument("--math", type=int, default=200, help="math-verify checks")
    parser.add_argument("--http-backend", default="zygote", help="the backend the REST service uses")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run the service for measure_http
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return

    load_start = os.getloadavg()[0]
    executions, items, probes = measure_paths(args)
    http_backend = args.http_backend if probes.get(args.http_backend, {}).get("available") else "nsjail"
    http = {"backend": http_backend, "endpoints": measure_http(http_backend, args.requests)}
    math_row = measure_math(args)
    payload = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "euid": os.geteuid()},
        "load_avg_1m": {"start": load_start, "end": os.getloadavg()[0]},
        "settings": vars(args) | {"python": PYTHON, "program": PROGRAM},
        "executions": executions,
        "code_item_4_tests": items,
        "http": http,
        "math_verify": math_row,
        "probe": probes,
    }
    out = write_result("verifier_throughput", payload)
    plot(payload, RESULTS / "verifier_throughput.png")
    print(f"{'what':<30} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for label, table in (("exec", executions), ("code item", items)):
        for name, row in table.items():
            if "per_s" in row:
                print(f"{label + ' ' + name:<30} {row['per_s']:>8} {row['p50_ms']:>8} {row['p99_ms']:>8}")
            else:
                print(f"{label + ' ' + name:<30} unavailable: {row['detail']}")
    for endpoint, rows in http["endpoints"].items():
        for concurrency, row in rows.items():
            label = f"{endpoint} c={concurrency}"
            print(f"{label:<30} {row['per_s']:>8} {row['p50_ms']:>8} {row['p99_ms']:>8}")
    print(f"{'math-verify check':<30} {math_row['per_s']:>8} {math_row['p50_ms']:>8} {math_row['p99_ms']:>8}")
    print(
        f"load average 1 min: {load_start:.2f} at the start, {payload['load_avg_1m']['end']:.2f} at the end"
    )
    print(f"wrote {out} and {RESULTS / 'verifier_throughput.png'}")


if __name__ == "__main__":
    main()
