"""A fresh run refuses to start over another run's state in the same Redis (it would see that run's
trained tasks as duplicates and mix two ledgers); the same state is what ``--resume`` continues."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from services.common.config import build_config
from services.common.ledger import RunLedger
from services.common.queue import StreamQueue
from services.common.redis_server import EmbeddedRedis
from services.coordinator.driver import Coordinator, RunStateError
from services.coordinator.rundir import RunDir


def test_a_fresh_run_over_an_old_runs_keys_is_refused(
    redis_server: EmbeddedRedis, tiny_model_dir: str, tmp_path: Path
) -> None:
    cfg = build_config({}, [f"coordinator.runs_dir={tmp_path}", "coordinator.run_name=guard",
                            "metrics.enabled=false", "coordinator.eval_problems=4"])  # fmt: skip
    # The coordinator's own view of the services, without starting Ray or any actor: only Redis is used
    # before the check.
    rt = SimpleNamespace(
        redis_url=redis_server.url, model_dir=tiny_model_dir, generators=[], verifiers=[], loop_failures=list
    )
    Coordinator(cfg, rt, RunDir(cfg))  # nothing there yet: accepted
    q = StreamQueue(redis_server.url, "guard")
    q.transaction("seed", RunLedger(q).admitting(["guard-t0"], cursor=1))  # an earlier run admitted a task
    with pytest.raises(
        RunStateError, match="already holds the state of a run named 'guard'; continue it with"
    ):
        Coordinator(cfg, rt, RunDir(cfg))
