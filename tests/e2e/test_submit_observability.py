"""A run submitted with ``make submit`` (the ``ray job submit`` CLI) to a real ``ray start --head`` on
loopback, scraped by a real Prometheus through Ray's service-discovery file, with the verifier REST service
beside it: the job succeeds, every Grafana panel's PromQL returns data, every alert rule loads and
evaluates. The head, Prometheus and the verifier are stopped by PID (never ``ray stop``)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from services.common.paths import project_cache_dir
from tests.e2e.processes import free_ports, get, service, wait_for

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "lpo-training.json"
STEPS = 6
RUN = "submitted"
BIN = Path(sys.executable).parent
# logical CPUs of the test's head: the tiny config's actors reserve 2 (generator) + 2 (learner) + 0.5
# (verifier), taking turns on the real cores in sync mode
HEAD_CPUS = 5
REPORT_INTERVAL_S = 1.0  # RAY_metrics_report_interval_ms of the head: how often Ray exports what was recorded


@dataclass
class Head:
    temp_dir: Path
    jobs_url: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    temp = Path(tempfile.mkdtemp(prefix="lpo-ray-", dir="/tmp"))  # short: Ray's unix sockets live here
    gcs, dash, metrics, agent, agent_grpc, client, node, objm = free_ports(8)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python` is the project venv's
        "RAY_AUTH_MODE": "disabled",  # set the same for the head and for `ray job submit`
        "RAY_metrics_report_interval_ms": str(int(REPORT_INTERVAL_S * 1000)),
        "RAY_USAGE_STATS_ENABLED": "0",
        "LPO_CACHE_DIR": str(project_cache_dir()),  # the tiny model built by the suite
    }
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--temp-dir={temp}",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--ray-client-server-port={client}",
        f"--node-manager-port={node}", f"--object-manager-port={objm}", f"--num-cpus={HEAD_CPUS}",
        "--include-dashboard=true", "--disable-usage-stats",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{dash}"

    def ready() -> bool:
        return bool(get(f"{url}/api/version")) and _discovery(temp)

    try:
        with service(
            "ray head", cmd, temp / "head.log", ready, 180, marker=str(temp), interrupt_first=True, env=env
        ):
            yield Head(temp, url, env)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _discovery(temp: Path) -> bool:
    path = temp / "prom_metrics_service_discovery.json"
    return path.exists() and bool(json.loads(path.read_text())[0]["targets"])


@pytest.fixture(scope="module")
def verifier_service(head: Head) -> Iterator[str]:
    (port,) = free_ports(1)
    cmd = [sys.executable, "-m", "services.verifier", "serve", "--port", str(port), "--redis-url", "none"]
    url = f"http://127.0.0.1:{port}"
    log = head.temp_dir / "verifier.log"
    with service("verifier service", cmd, log, lambda: get(f"{url}/healthz"), 120, cwd=REPO, env=head.env):
        yield url


@pytest.fixture(scope="module")
def prometheus(head: Head, verifier_service: str) -> Iterator[str]:
    if shutil.which("prometheus") is None:
        pytest.fail(
            "prometheus is not installed: .ci/run installs Debian's prometheus (apt-get install prometheus)"
        )
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    assert set(jobs) == {"ray", "lpo-verifier"}, jobs
    # The shipped config with this test's paths and ports, and a fast scrape for a short run.
    cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    cfg["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yml")]
    jobs["ray"]["file_sd_configs"][0]["files"] = [str(head.temp_dir / "prom_metrics_service_discovery.json")]
    jobs["lpo-verifier"]["static_configs"][0]["targets"] = [verifier_service.removeprefix("http://")]
    conf = head.temp_dir / "prometheus.yml"
    conf.write_text(yaml.safe_dump(cfg))
    (port,) = free_ports(1)
    cmd = [
        "prometheus", f"--config.file={conf}", f"--storage.tsdb.path={head.temp_dir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with service("prometheus", cmd, head.temp_dir / "prometheus.log", lambda: get(f"{url}/-/ready"), 60):
        yield url


@dataclass
class Submitted:
    run_dir: Path
    started: float
    ended: float
    output: str


@pytest.fixture(scope="module")
def submitted(head: Head, prometheus: str, verifier_service: str, tmp_path_factory) -> Submitted:
    runs = tmp_path_factory.mktemp("runs")
    _score_some(verifier_service)  # the verifier service's series get real observations too
    overrides = [
        f"coordinator.steps={STEPS}", "coordinator.eval_every=3", "coordinator.eval_problems=16",
        f"coordinator.runs_dir={runs}", f"coordinator.run_name={RUN}", "metrics.poll_s=1",
    ]  # fmt: skip
    args = "ARGS=" + " ".join(f"--set {o}" for o in overrides)
    started = time.time()
    proc = subprocess.run(
        ["make", "--no-print-directory", "submit", f"SUBMIT_ID=lpo-{RUN}", args],
        cwd=REPO, env={**head.env, "RAY_ADDRESS": head.jobs_url},
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    from ray.job_submission import JobStatus, JobSubmissionClient

    status = JobSubmissionClient(head.jobs_url).get_job_status(f"lpo-{RUN}")
    assert status == JobStatus.SUCCEEDED, status
    # The job's last values reach Prometheus with Ray's next reports and the scrapes after them: wait
    # until every target has been scraped two report intervals after the job ended.
    done = time.time()
    wait_for(
        "a scrape of every target after the job's last metrics reports",
        lambda: _oldest_latest_scrape(prometheus) >= done + 2 * REPORT_INTERVAL_S,
        timeout_s=60,
    )
    return Submitted(runs / RUN, started, time.time(), output)


def _oldest_latest_scrape(prom: str) -> float:
    """The least recent of the targets' latest scrape times (``timestamp(up)``); 0 before any scrape."""
    params = urllib.parse.urlencode({"query": "min(timestamp(up))"})
    body = json.loads(get(f"{prom}/api/v1/query?{params}"))
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def _score_some(url: str) -> None:
    items = [
        {"id": "c1", "task": "countdown", "response": "<answer>1 + 2</answer>", "nums": [1, 2], "target": 3},
        {"id": "c2", "task": "countdown", "response": "<answer>1 * 2</answer>", "nums": [1, 2], "target": 3},
        {"id": "m1", "task": "math", "response": "so \\boxed{4}", "answer": "4"},
    ]
    req = urllib.request.Request(
        f"{url}/v1/verify",
        data=json.dumps({"items": items}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        statuses = [r["status"] for r in json.loads(resp.read())["results"]]
    assert statuses == ["pass", "fail", "pass"], statuses


def _query_range(prom: str, expr: str, start: float, end: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "2s"})
    body = json.loads(get(f"{prom}/api/v1/query_range?{params}"))
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _panels() -> list[dict]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def _concrete(expr: str) -> str:
    """Grafana's variables as Grafana would fill them for this run (rate window: 4 scrape intervals+)."""
    return expr.replace("$run", RUN).replace("$__rate_interval", "10s")


# ---------------------------------------------------------------- the tests


def test_submitted_run_succeeds_and_writes_its_run_directory(submitted: Submitted) -> None:
    summary = json.loads((submitted.run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["final_version"] == STEPS
    assert summary["trained_groups"] == STEPS * 16
    assert len((submitted.run_dir / "metrics.jsonl").read_text().splitlines()) == STEPS
    assert "Pass@1" in submitted.output  # the job's log streamed back by `ray job submit`


def test_every_dashboard_panel_returns_data(submitted: Submitted, prometheus: str) -> None:
    empty, report = [], []
    for panel in _panels():
        for target in panel["targets"]:
            series = _query_range(prometheus, _concrete(target["expr"]), submitted.started, submitted.ended)
            report.append(f"{len(series):3d} series  {panel['title']} [{target['refId']}]")
            if not series:
                empty.append(f"{panel['title']}: {target['expr']}")
    print("\n".join(report))
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_run_series_carry_the_run_and_match_the_run_directory(submitted: Submitted, prometheus: str) -> None:
    def peak(expr: str) -> float:
        [series] = _query_range(prometheus, expr, submitted.started, submitted.ended)
        return max(float(v) for _, v in series["values"])

    assert peak(f'max(ray_lpo_learner_steps_total{{run="{RUN}"}})') == STEPS
    assert peak(f'max(ray_lpo_learner_weights_version{{run="{RUN}"}})') == STEPS
    assert peak(f'sum(ray_lpo_policy_lag_bucket{{run="{RUN}",le="0.5"}})') == STEPS * 16  # all at lag 0
    assert peak(f'max(ray_lpo_generators_alive{{run="{RUN}"}})') == 1


def test_gauges_set_once_stay_exported_for_the_whole_run(submitted: Submitted, prometheus: str) -> None:
    # Ray drops a gauge series not re-recorded within two report intervals; the expected generator count
    # is set once when the run starts and must still be there (without a gap) when the last step lands.
    [expected] = _query_range(
        prometheus, f'ray_lpo_generators_expected{{run="{RUN}"}}', submitted.started, submitted.ended
    )
    times = [float(t) for t, _ in expected["values"]]
    assert all(b - a == 2.0 for a, b in itertools.pairwise(times)), times  # the range query's 2 s step
    [steps] = _query_range(
        prometheus, f'max(ray_lpo_learner_steps_total{{run="{RUN}"}})', submitted.started, submitted.ended
    )
    last_step_at = min(float(t) for t, v in steps["values"] if float(v) == STEPS)
    assert times[0] < last_step_at <= times[-1], (times[0], last_step_at, times[-1])


def test_every_alert_rule_loads_and_evaluates(submitted: Submitted, prometheus: str) -> None:
    shipped = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    names = {r["alert"] for g in shipped["groups"] for r in g["rules"]}
    body = json.loads(get(f"{prometheus}/api/v1/rules"))
    rules = {r["name"]: r for g in body["data"]["groups"] for r in g["rules"]}
    assert set(rules) == names
    for name, rule in rules.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
        assert rule["lastEvaluation"] > "2000", (name, rule)


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    rules = DEPLOY / "prometheus"
    check = subprocess.run(
        ["promtool", "check", "rules", str(rules / "alerts.yml")], capture_output=True, text=True
    )
    assert check.returncode == 0 and "SUCCESS: 8 rules found" in check.stdout + check.stderr, check.stderr
    unit = subprocess.run(
        ["promtool", "test", "rules", "alerts_test.yml"], cwd=rules, capture_output=True, text=True
    )
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout + unit.stderr, unit.stdout + unit.stderr
