"""The run directory: resolved config, per-step metrics, evaluations, summary, curves, checkpoints."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from services.common.config import RunConfig, dump_config

logger = logging.getLogger(__name__)


CHECKPOINT = "checkpoint.json"


class RunDir:
    """``runs/<name>/``. A fresh run never overwrites an older one: that is moved aside first; a resumed
    run continues in place.

    Checkpoints: ``checkpoints/learner/step-<N>/`` (DeepSpeed), ``checkpoints/step-<N>/`` (HF export) and
    ``checkpoint.json``, which names the newest complete one and is written last (temp file + rename).
    ``redis/`` holds the embedded Redis server's AOF.
    """

    def __init__(self, cfg: RunConfig, *, resume: bool = False) -> None:
        self.path = Path(cfg.coordinator.runs_dir) / cfg.coordinator.run_name
        if resume and not (self.path / "config.yaml").is_file():
            raise FileNotFoundError(f"--resume {self.path}: no run directory with a config.yaml there")
        if self.path.exists() and not resume:
            aside = self.path.with_name(f"{self.path.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}")
            self.path.rename(aside)
            logger.warning("run directory %s existed; moved it to %s", self.path, aside)
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        (self.path / "config.yaml").write_text(dump_config(cfg))

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def learner_checkpoints(self) -> Path:
        return self.path / "checkpoints" / "learner"

    @property
    def redis_dir(self) -> Path:
        return self.path / "redis"

    def read_checkpoint(self) -> dict[str, Any] | None:
        """The newest complete checkpoint's record, None before the first one."""
        path = self.path / CHECKPOINT
        return json.loads(path.read_text()) if path.is_file() else None

    def prune_checkpoints(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` checkpoints (DeepSpeed state and HF export); returns tags."""
        tags = sorted(
            (p.name for p in self.learner_checkpoints.glob("step-*") if p.is_dir()),
            key=lambda t: int(t.split("-")[1]),
        )
        old = tags[:-keep]
        for tag in old:
            shutil.rmtree(self.learner_checkpoints / tag, ignore_errors=True)
            shutil.rmtree(self.checkpoints / tag, ignore_errors=True)
        return old

    def truncate_after(self, step: int) -> None:
        """Forget the step and eval records after ``step`` (a resumed run writes them again)."""
        for name in ("metrics.jsonl", "eval.jsonl"):
            kept = [r for r in self.read(name) if r["step"] <= step]
            path = self.path / name
            if path.exists():
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
                tmp.replace(path)

    def log_resume(self, record: dict[str, Any]) -> None:
        self._append("resumes.jsonl", record)

    def log_replay(self, record: dict[str, Any]) -> None:
        """A step replayed after a resume, and whether it re-made the lost learner's weights exactly."""
        self._append("replays.jsonl", record)

    def _append(self, name: str, record: dict[str, Any]) -> None:
        with (self.path / name).open("a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")

    def log_step(self, record: dict[str, Any]) -> None:
        self._append("metrics.jsonl", record)

    def log_eval(self, record: dict[str, Any]) -> None:
        self._append("eval.jsonl", record)

    def read(self, name: str) -> list[dict[str, Any]]:
        path = self.path / name
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def write_json(self, name: str, payload: dict[str, Any]) -> Path:
        """``name`` in the run directory, written whole or not at all (temp file + rename)."""
        path = self.path / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
        tmp.replace(path)
        return path

    def write_summary(self, summary: dict[str, Any]) -> Path:
        return self.write_json("summary.json", summary)

    def plot_curves(self) -> Path:
        """Reward, Pass@1, KL and entropy against the learner step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = self.read("metrics.jsonl")
        evals = self.read("eval.jsonl")
        fig, axes = plt.subplots(2, 2, figsize=(10, 7))
        x = [r["step"] for r in steps]
        panels = [
            (axes[0, 0], "reward_mean", "mean reward (rollouts)"),
            (axes[1, 0], "kl_forward", "KL(w* || P_theta)"),
            (axes[1, 1], "entropy", "sampled-token entropy"),
        ]
        for ax, key, title in panels:
            ax.plot(x, [r.get(key, float("nan")) for r in steps], marker=".")
            ax.set_title(title)
            ax.set_xlabel("learner step")
        ax = axes[0, 1]
        ev_x = [e["step"] for e in evals]
        # One colour per evaluation set, one marker per k; validation sets dashed.
        for i, (name, first) in enumerate((evals[0]["sets"] if evals else {}).items()):
            for j, k in enumerate(first["pass_at"]):
                ax.plot(
                    ev_x,
                    [e["sets"][name]["pass_at"][k] for e in evals],
                    color=f"C{i}",
                    marker="os^vD"[j % 5],
                    linestyle="-" if first["report"] else "--",
                    label=f"{name} Pass@{k}",
                )
        ax.set_title("evaluation sets")
        ax.set_xlabel("learner step")
        ax.legend()
        fig.tight_layout()
        out = self.path / "curves.png"
        fig.savefig(out, dpi=90)
        plt.close(fig)
        return out
