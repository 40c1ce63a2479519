"""The run directory's resume support: truncation of records past a checkpoint and checkpoint pruning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.config import build_config
from services.coordinator.rundir import RunDir


def _cfg(tmp_path: Path):
    return build_config({}, [f"coordinator.runs_dir={tmp_path}", "coordinator.run_name=r"])


def test_resume_keeps_the_directory_and_truncates_records_after_the_checkpoint(tmp_path: Path) -> None:
    rd = RunDir(_cfg(tmp_path))
    for step in range(1, 8):
        rd.log_step({"step": step})
    for step in (0, 4, 7):
        rd.log_eval({"step": step})
    again = RunDir(_cfg(tmp_path), resume=True)
    assert again.path == rd.path and not list(tmp_path.glob("r.prev-*"))
    again.truncate_after(4)
    assert [r["step"] for r in again.read("metrics.jsonl")] == [1, 2, 3, 4]
    assert [r["step"] for r in again.read("eval.jsonl")] == [0, 4]
    RunDir(_cfg(tmp_path))  # a fresh run with the same name moves the old one aside
    assert len(list(tmp_path.glob("r.prev-*"))) == 1


def test_resume_needs_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no run directory"):
        RunDir(_cfg(tmp_path), resume=True)


def test_prune_keeps_the_newest_checkpoints_in_step_order(tmp_path: Path) -> None:
    rd = RunDir(_cfg(tmp_path))
    for step in (4, 8, 12, 100):
        (rd.learner_checkpoints / f"step-{step}").mkdir(parents=True)
        (rd.checkpoints / f"step-{step}").mkdir()
    assert rd.prune_checkpoints(keep=2) == ["step-4", "step-8"]  # numeric, not string, order
    assert sorted(p.name for p in rd.learner_checkpoints.iterdir()) == ["step-100", "step-12"]
    assert not (rd.checkpoints / "step-4").exists() and (rd.checkpoints / "step-12").exists()
    assert rd.read_checkpoint() is None
    rd.write_json("checkpoint.json", {"step": 12})
    assert rd.read_checkpoint() == {"step": 12}
    assert json.loads((rd.path / "checkpoint.json").read_text())["step"] == 12
