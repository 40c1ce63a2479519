"""A run across two Ray nodes, and the loss of one of them.

Two raylets on this machine, each started with ``ray start`` as a cluster's nodes are: the head (on the
machine's address, where Ray puts a head asked for loopback) offers the custom resource
``lpo_learner_node`` and the worker (``ray start --address``, on 127.0.0.2, so Ray sees two hosts) offers
``lpo_rollout_node``. The run reserves them through
``cluster.*.resources``: the learner sits on the head beside the coordinator (the driver), the generator and
the verifier on the worker, and weight snapshots cross between them through the Ray object store
(``weights.transport: object_store``). Mid-run the worker node's raylet and every process it started are
SIGKILLed; the head marks the node dead, the actors wait for a node that offers their resource, a new
worker node is started, the actors are re-created on it and the run completes with every admitted task in
the ledger (0 lost, 0 duplicates). Each node's processes carry a marker in their environment, which is how
the test finds the actors' nodes and how it stops everything it started, by PID (never ``ray stop``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from ray._private.services import get_node_ip_address

from services.common.paths import project_cache_dir
from tests.e2e.processes import free_ports, pids_with_env, spawn, stop_group, wait_for

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MARK = "LPO_TEST_NODE"  # environment variable naming the node a process belongs to
STEPS, KILL_AT = 14, 4  # learner steps; the worker node is killed once KILL_AT steps are done
PROMPTS = 16


def _ray_env(marker: str) -> dict[str, str]:
    return {
        **os.environ,
        MARK: marker,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "LPO_CACHE_DIR": str(project_cache_dir()),
        # the head declares a silent node dead after ~3 s instead of ~15-30 s
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    }


def _node_ports() -> list[str]:
    node, objm, metrics, agent, agent_grpc, runtime_env = free_ports(6)
    return [
        f"--node-manager-port={node}", f"--object-manager-port={objm}", f"--metrics-export-port={metrics}",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}",
    ]  # fmt: skip


def _nodes(gcs: str) -> list[dict]:
    """The cluster's nodes as the GCS sees them (from a separate driver: this test process stays out of
    Ray, which other tests of the session start for themselves)."""
    code = (
        f"import json, ray; ray.init(address={gcs!r}, log_to_driver=False); "
        "print('NODES', json.dumps("
        "[{'ip': n['NodeManagerAddress'], 'alive': n['Alive']} for n in ray.nodes()]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_ray_env("probe")
    )
    if out.returncode != 0:
        raise OSError(out.stderr[-2000:])
    # Ray may print warnings to stdout too
    [line] = [x for x in out.stdout.splitlines() if x.startswith("NODES ")]
    return json.loads(line.removeprefix("NODES "))


def _alive(gcs: str, ip: str) -> bool:
    return any(n["alive"] and n["ip"] == ip for n in _nodes(gcs))


def _actor_pids(kind: str, marker: str) -> list[int]:
    """PIDs of ``ray::<kind>`` processes of the node marked ``marker``."""
    out = []
    for pid in pids_with_env(MARK, marker):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(f"ray::{kind}".encode()):
                out.append(pid)
    return out


def _steps_done(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def _worker_node(gcs: str, marker: str, log: Path) -> subprocess.Popen:
    cmd = [
        str(BIN / "ray"), "start", f"--address={gcs}", "--block", "--node-ip-address=127.0.0.2",
        "--num-cpus=3", '--resources={"lpo_rollout_node": 4}', "--disable-usage-stats", *_node_ports(),
    ]  # fmt: skip
    proc = spawn(cmd, log, env=_ray_env(marker))
    wait_for(f"worker node {marker}", lambda: _alive(gcs, "127.0.0.2"), 180, log)
    return proc


def test_run_spans_two_nodes_and_survives_losing_the_worker_node(tmp_path: Path, capsys) -> None:
    temp = Path(tempfile.mkdtemp(prefix="lpo-2n-", dir="/tmp"))  # short: Ray's unix sockets live here
    tag = uuid.uuid4().hex[:8]
    head_mark, worker_mark, worker2_mark = f"head-{tag}", f"worker-{tag}", f"worker2-{tag}"
    (gcs_port, client) = free_ports(2)
    head_ip = get_node_ip_address()
    gcs = f"{head_ip}:{gcs_port}"
    head_cmd = [
        str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", f"--temp-dir={temp}",
        f"--node-ip-address={head_ip}", "--include-dashboard=false", f"--ray-client-server-port={client}",
        "--num-cpus=3", '--resources={"lpo_learner_node": 4}', "--disable-usage-stats", *_node_ports(),
    ]  # fmt: skip
    started: list[subprocess.Popen] = []
    run_dir = tmp_path / "two-nodes"
    try:
        started.append(spawn(head_cmd, temp / "head.log", env=_ray_env(head_mark)))
        wait_for("ray head", lambda: _alive(gcs, head_ip), 180, temp / "head.log")
        started.append(_worker_node(gcs, worker_mark, temp / "worker.log"))

        sets = [
            "--config", "configs/countdown-tiny.yaml",
            "--set", f"cluster.address={gcs}",
            "--set", "cluster.generator.resources={lpo_rollout_node: 1}",
            "--set", "cluster.verifier.resources={lpo_rollout_node: 1}",
            "--set", "cluster.learner.resources={lpo_learner_node: 1}",
            "--set", "weights.transport=object_store",
            "--set", f"coordinator.steps={STEPS}", "--set", "coordinator.eval_every=0",
            "--set", "coordinator.eval_problems=16",
            "--set", "queue.claim_idle_ms=3000",  # a dead consumer's entries are reclaimed after 3 s
            "--set", f"coordinator.runs_dir={tmp_path}", "--set", f"coordinator.run_name={run_dir.name}",
        ]  # fmt: skip
        log = tmp_path / "coordinator.log"
        coordinator = spawn(
            [sys.executable, "-m", "services.coordinator", *sets], log, cwd=REPO, env=_ray_env(head_mark)
        )
        started.append(coordinator)

        def reached(n: int) -> bool:
            if coordinator.poll() is not None:
                raise AssertionError(
                    f"the run ended early ({coordinator.returncode}):\n{log.read_text()[-4000:]}"
                )
            return _steps_done(run_dir) >= n

        wait_for(f"step {KILL_AT}", lambda: reached(KILL_AT), 600, log)
        # Placement: the learner beside the coordinator on the head, the rollout actors on the worker.
        assert _actor_pids("LearnerRank", head_mark) and not _actor_pids("LearnerRank", worker_mark)
        gen, ver = _actor_pids("GeneratorActor", worker_mark), _actor_pids("VerifierActor", worker_mark)
        assert gen and ver and not _actor_pids("GeneratorActor", head_mark), (gen, ver)
        # The weight registry needs no resources; it lives beside its publisher, not on the node to be lost.
        assert _actor_pids("WeightRegistry", head_mark) and not _actor_pids("WeightRegistry", worker_mark)

        victims = pids_with_env(MARK, worker_mark)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed_at = _steps_done(run_dir)
        wait_for("the head to declare the worker node dead", lambda: not _alive(gcs, "127.0.0.2"), 120)
        assert not pids_with_env(MARK, worker_mark)
        # Without a node that offers lpo_rollout_node the run cannot step: nothing was trained meanwhile
        # beyond the step in flight when the node died.
        assert coordinator.poll() is None and _steps_done(run_dir) <= killed_at + 1

        started.append(_worker_node(gcs, worker2_mark, temp / "worker2.log"))
        wait_for(
            "the generator and verifier re-created on the new worker node",
            lambda: (
                _actor_pids("GeneratorActor", worker2_mark) and _actor_pids("VerifierActor", worker2_mark)
            ),
            300,
            log,
        )
        coordinator.wait(timeout=900)
        output = log.read_text(errors="replace")
        assert coordinator.returncode == 0, output[-5000:]

        summary = json.loads((run_dir / "summary.json").read_text())
        ledger = summary["ledger"]
        assert summary["lost"] == 0 and summary["duplicates"] == 0, ledger
        assert ledger["trained"] == STEPS * PROMPTS and ledger["in_flight"] == 0, ledger
        assert ledger["admitted"] == ledger["trained"] + ledger["dropped"] + ledger["dead_lettered"], ledger
        assert summary["final_version"] == STEPS, summary["final_version"]
        with capsys.disabled():
            print(
                f"\n[two nodes] worker node killed at step {killed_at} ({len(victims)} processes SIGKILLed), "
                f"declared dead by the head, replaced by a new node; run finished {STEPS} steps: ledger "
                f"{json.dumps(ledger)}"
            )
    finally:
        for proc in reversed(started):
            # `ray start --block` stops in ~2 s on SIGINT (30 s on SIGTERM); the coordinator: a Ctrl-C
            stop_group(proc, interrupt_first=True)
        for marker in (worker2_mark, worker_mark, head_mark):
            for pid in pids_with_env(MARK, marker):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30  # SIGKILLed processes vanish once reaped
    while time.monotonic() < deadline and any(
        pids_with_env(MARK, m) for m in (head_mark, worker_mark, worker2_mark)
    ):
        time.sleep(0.5)
    assert not any(pids_with_env(MARK, m) for m in (head_mark, worker_mark, worker2_mark))
    shutil.rmtree(temp, ignore_errors=True)
