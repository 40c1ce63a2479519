"""Every deploy manifest parses and says what the service needs: the KubeRay RayJob, the Redis Deployment,
the Ray cluster launcher config, the job runtime env, Grafana provisioning and the metric names of the
dashboard and alert rules (each exported by services/common/metrics.py, the verifier service or Ray).
(Every shipped config is parsed in test_config.py.)"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml

from services.common.config import load_config
from services.common.metrics import exported_names

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
# Series the verifier REST service exports itself (services/verifier/app.py, prometheus_client).
VERIFIER_SERVICE = {
    "lpo_verifier_items_total",
    "lpo_verifier_item_seconds_bucket",
    "lpo_verifier_canary_ok",
    "lpo_verifier_busy_slots",
    "lpo_verifier_requests_in_flight",
}
# Ray's own node metrics used by the infrastructure row (served by Ray's metrics agent).
RAY_SYSTEM = {"ray_node_cpu_utilization", "ray_node_mem_used", "ray_object_store_memory", "ray_actors"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _entrypoint_config(command: str) -> Path:
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "services.coordinator"], argv
    return REPO / argv[argv.index("--config") + 1]


def test_rayjob_runs_the_coordinator_on_head_cpu_and_gpu_groups() -> None:
    [job, monitor] = _docs(DEPLOY / "kuberay" / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    config = _entrypoint_config(spec["entrypoint"])
    assert config.is_file(), config
    overrides = re.findall(r"--set (\S+)", spec["entrypoint"])
    load_config(config, overrides)  # the job's config and overrides validate
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["metrics-export-port"] == "8080"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu["nvidia.com/gpu"]) >= 1
    for pod in [head, *groups.values()]:
        ports = {p["name"]: p["containerPort"] for p in pod["template"]["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == 8080
        assert pod["template"]["metadata"]["labels"]["ray.io/metrics"] == "true"
    assert monitor["kind"] == "PodMonitor"
    assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/metrics": "true"}


def test_redis_manifest_persists_with_aof_everysec() -> None:
    docs = {d["kind"]: d for d in _docs(DEPLOY / "kubernetes" / "redis.yaml")}
    assert set(docs) == {"PersistentVolumeClaim", "Deployment", "Service"}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    flags = dict(zip(args[::2], args[1::2], strict=True))
    assert flags["--appendonly"] == "yes" and flags["--appendfsync"] == "everysec"
    assert flags["--maxmemory-policy"] == "noeviction"  # never evict queued groups or snapshots
    [volume] = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert docs["Deployment"]["spec"]["strategy"]["type"] == "Recreate"
    service = docs["Service"]["spec"]
    assert service["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert service["ports"][0]["port"] == 6379


def test_cluster_launcher_config_has_head_and_worker_types() -> None:
    cfg = yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands"):
        assert key in cfg, key
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and {"gpu_worker", "cpu_worker"} <= set(types)
    assert sum(t.get("max_workers", 0) for t in types.values()) <= cfg["max_workers"]
    assert any("requirements/gpu.txt" in c for c in cfg["setup_commands"])
    commands = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert "ray stop" not in commands  # never: it kills every Ray process on the machine
    assert commands.count("--metrics-export-port=8080") == 2


def test_runtime_env_uploads_the_code_not_the_caches() -> None:
    env = yaml.safe_load((DEPLOY / "ray" / "runtime_env.yaml").read_text())
    assert {".venv/", ".cache/", "runs/"} <= set(env["excludes"])
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray refuses non-string values
    makefile = (REPO / "Makefile").read_text()
    assert "ray job submit --working-dir . --runtime-env deploy/ray/runtime_env.yaml" in makefile


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    [ds] = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    assert ds["type"] == "prometheus" and ds["isDefault"] is True
    [provider] = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "lpo.yml").read_text())[
        "providers"
    ]
    assert provider["type"] == "file" and provider["options"]["path"]


def _dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "lpo-training.json").read_text())


def test_dashboard_has_the_five_rows_and_unique_panel_ids() -> None:
    panels = _dashboard()["panels"]
    rows = [p["title"] for p in panels if p["type"] == "row"]
    for want in ("Overview", "Learning", "Async health", "Verifier", "Infrastructure"):
        assert any(r.startswith(want) for r in rows), (want, rows)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]


def test_dashboard_uses_only_metrics_that_exist() -> None:
    known = exported_names() | VERIFIER_SERVICE | RAY_SYSTEM
    used = set()
    for panel in _dashboard()["panels"]:
        for target in panel.get("targets", []):
            used |= set(re.findall(r"\b((?:ray_|lpo_)[a-z0-9_]+)\b", target["expr"]))
    assert used, "no metric names found"
    assert used <= known, sorted(used - known)


def test_alert_rules_use_only_metrics_that_exist() -> None:
    known = exported_names() | VERIFIER_SERVICE
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == 8
    for rule in rules:
        used = set(re.findall(r"\b((?:ray_|lpo_)[a-z0-9_]+)\b", rule["expr"]))
        assert used and used <= known, (rule["alert"], sorted(used - known))
