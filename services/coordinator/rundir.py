"""The run directory: resolved config, per-step metrics, evaluations, summary, curves, checkpoints."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from services.common.config import RunConfig, dump_config

logger = logging.getLogger(__name__)


class RunDir:
    """``runs/<name>/``. A fresh run never overwrites an older one: that is moved aside first."""

    def __init__(self, cfg: RunConfig, *, resume: bool = False) -> None:
        self.path = Path(cfg.coordinator.runs_dir) / cfg.coordinator.run_name
        if self.path.exists() and not resume:
            aside = self.path.with_name(f"{self.path.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}")
            self.path.rename(aside)
            logger.warning("run directory %s existed; moved it to %s", self.path, aside)
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        (self.path / "config.yaml").write_text(dump_config(cfg))

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

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
        ax.plot(ev_x, [e["pass_at_1"] for e in evals], marker="o", label="Pass@1")
        if evals:
            ax.plot(ev_x, [e["pass_at_k"] for e in evals], marker="s", label=f"Pass@{evals[0]['k']}")
        ax.set_title("held-out evaluation")
        ax.set_xlabel("learner step")
        ax.legend()
        fig.tight_layout()
        out = self.path / "curves.png"
        fig.savefig(out, dpi=90)
        plt.close(fig)
        return out
