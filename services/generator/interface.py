"""The rollout engine a generator drives: sample groups, load weights. Backends stay behind it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from services.common.messages import Rollout, RolloutTask, TensorEntry


class RolloutEngine(Protocol):
    """Samples with whatever weights it holds; the generator decides when to swap them."""

    restarts: int
    """Times the backend recreated its engine after a failed load (exported as a metric)."""

    def generate(self, tasks: Sequence[RolloutTask]) -> list[list[Rollout]]:
        """``task.group_size`` rollouts per task, each with per-token behaviour log-probs."""
        ...

    def load_weights(self, payload_path: Path, manifest: tuple[TensorEntry, ...]) -> None:
        """Replace the weights in place with a full checkpoint-format state."""
        ...
