"""Suite-wide hooks: tests marked ``gpu`` run only where CUDA is available and are skipped, with the reason,
everywhere else (the CPU machines that run ``make test``)."""

from __future__ import annotations

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
