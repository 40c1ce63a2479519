"""A real Ray node's metrics agent drops a gauge series that is not re-recorded within two report
intervals; the recorder's gauge keeper keeps a gauge that was set once exported until the recorder is
closed. Run in a child process with its own Ray (1 s report interval, its own metrics-export port)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import json, os, sys, time, urllib.request
    os.environ["RAY_metrics_report_interval_ms"] = "1000"
    import ray
    from ray.util import metrics as rm
    from services.common.metrics import Metrics

    port = int(sys.argv[1])
    ray.init(num_cpus=1, include_dashboard=True, _metrics_export_port=port, log_to_driver=False)

    def exported() -> set[str]:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        return {line.split("{")[0] for line in body.splitlines() if line.startswith("ray_lpo_")
                or line.startswith("ray_probe_")}

    kept = Metrics("keeper-test")
    kept.set("lpo_generators_expected", 3)
    bare = rm.Gauge("probe_bare_gauge", description="set once, not kept")
    bare.set(1.0)
    seen = []
    for _ in range(8):  # 8 s = 8 report intervals, four times the agent's gauge TTL
        time.sleep(1.0)
        seen.append(sorted(exported()))
    kept.close()
    time.sleep(5.0)
    after_close = sorted(exported())
    print(json.dumps({"seen": seen, "after_close": after_close}))
    ray.shutdown()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_gauge_set_once_stays_exported_until_its_recorder_closes() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(_free_port())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env={
            "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
            "PYTHONPATH": str(REPO),
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "HOME": str(Path.home()),
        },
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    seen = result["seen"]
    # without the keeper, Ray drops the series (the control): gone after the first few scrapes
    assert any("ray_probe_bare_gauge" in s for s in seen[:2]), seen[:2]
    assert "ray_probe_bare_gauge" not in seen[-1], seen[-1]
    # with it, every scrape from the first one with data to the last carries the gauge
    first = next(i for i, s in enumerate(seen) if "ray_lpo_generators_expected" in s)
    assert first <= 2 and all("ray_lpo_generators_expected" in s for s in seen[first:]), seen
    assert "ray_lpo_generators_expected" not in result["after_close"], result["after_close"]
