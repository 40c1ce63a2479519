"""Suite-wide hooks: tests marked ``gpu`` run only where CUDA is available and are skipped, with the reason,
everywhere else (the CPU machines that run ``make test``); and IEEE subnormals restored after every test.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

GPU_SKIP_REASON = "needs a CUDA GPU (torch.cuda.is_available() is False on this machine)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return  # no torch import for a run without gpu tests
    import torch

    if torch.cuda.is_available():
        return
    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason=GPU_SKIP_REASON))


@pytest.fixture(autouse=True)
def _ieee_subnormals_after_each_test() -> Iterator[None]:
    """A ``LearnerEngine`` built in the test process flushes subnormals to zero on its thread and on torch's
    OpenMP workers, as a learner process should; the flags outlive the test, and later tests (hypothesis
    among them) need IEEE arithmetic. So they are switched back once a test has used the engine."""
    yield
    engine = sys.modules.get("services.learner.engine")
    if engine is not None:
        engine.flush_denormals(False)
