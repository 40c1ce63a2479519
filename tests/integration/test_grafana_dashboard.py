"""The Grafana dashboard JSON type-checks against the ``@grafana/schema`` Dashboard type (npm + tsc, the
versions pinned in deploy/grafana/typecheck/package-lock.json), built in a temporary directory: nothing is
written into the repository. Its PromQL is checked against a real Prometheus in
tests/e2e/test_submit_observability.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECK = REPO / "deploy" / "grafana" / "typecheck"
DASHBOARDS = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/grafana/typecheck with its pinned packages installed (``npm ci``)."""
    if shutil.which("npm") is None:
        pytest.fail("npm is not installed: .ci/run installs it (apt-get install npm)")
    project = tmp_path_factory.mktemp("grafana-typecheck")
    for name in ("package.json", "package-lock.json", "tsconfig.json"):
        shutil.copy(CHECK / name, project / name)
    proc = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--prefer-offline"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return project


def _typecheck(project: Path, dashboard: dict, name: str) -> subprocess.CompletedProcess[str]:
    """Type-check ``dashboard`` alone (tsconfig.json includes every file under generated/)."""
    generated = project / "generated"
    shutil.rmtree(generated, ignore_errors=True)
    generated.mkdir()
    body = json.dumps(dashboard, indent=2)
    (generated / f"{name}.ts").write_text(
        'import type { Dashboard } from "@grafana/schema";\n\n'
        f"export const dashboard: Dashboard = {body};\n"
    )
    tsc = project / "node_modules" / ".bin" / "tsc"
    return subprocess.run([str(tsc), "-p", str(project)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_type_checks_against_grafana_schema(project: Path, path: Path) -> None:
    proc = _typecheck(project, json.loads(path.read_text()), path.stem)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_type_check_rejects_a_broken_dashboard(project: Path) -> None:
    broken = json.loads(DASHBOARDS[0].read_text())
    broken["graphTooltip"] = 7  # not a DashboardCursorSync value
    broken["panels"][0]["collapsed"] = "no"  # a row's `collapsed` is a boolean
    proc = _typecheck(project, broken, "broken")
    assert proc.returncode != 0
    assert "graphTooltip" in proc.stdout or "DashboardCursorSync" in proc.stdout, proc.stdout
    assert "collapsed" in proc.stdout or "boolean" in proc.stdout, proc.stdout
