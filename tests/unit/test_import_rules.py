"""The layering the code is read by: a service knows only ``services/common`` and its own folder (the
coordinator composes the services), and ``services/common`` knows no service. Checked on the source, so a
deferred import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

SERVICES = Path(__file__).resolve().parents[2] / "services"
LEAVES = ("generator", "verifier", "learner")


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return {m for m in out if m.startswith("services.")}


def _service(module: str) -> str:
    return module.split(".")[1]


def test_services_import_only_common_and_themselves() -> None:
    bad = []
    for leaf in LEAVES:
        for path in (SERVICES / leaf).rglob("*.py"):
            bad += [
                f"{path.relative_to(SERVICES)} imports {m}"
                for m in _imports(path)
                if _service(m) not in ("common", leaf)
            ]
    assert not bad, "\n".join(bad)


def test_common_imports_no_service() -> None:
    bad = [
        f"{path.relative_to(SERVICES)} imports {m}"
        for path in (SERVICES / "common").rglob("*.py")
        for m in _imports(path)
        if _service(m) != "common"
    ]
    assert not bad, "\n".join(bad)


def test_the_rule_sees_deferred_imports(tmp_path: Path) -> None:
    # A deferred (function-level) import couples the services as much as a top-level one.
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from services.coordinator.evaluation import pass_at_k\n")
    assert _imports(sample) == {"services.coordinator.evaluation"}
