"""The weight transport fits the model: snapshot bytes from the checkpoint's headers, the redis transport
refused past ``weights.redis_budget_mb`` with the sizes and the fix, and the paper recipes off Redis."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from services.common.config import ConfigError, build_config, load_config
from services.coordinator.runtime import check_weight_budget, snapshot_nbytes

REPO = Path(__file__).resolve().parents[2]


def test_snapshot_bytes_count_every_tensor_in_the_published_dtype(tmp_path: Path) -> None:
    save_file(
        {"a": torch.zeros(100, 10), "b": torch.zeros(24, dtype=torch.bfloat16)}, tmp_path / "m.safetensors"
    )
    assert snapshot_nbytes(tmp_path, "float32") == (1000 + 24) * 4
    assert snapshot_nbytes(tmp_path, "bfloat16") == (1000 + 24) * 2
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        snapshot_nbytes(tmp_path / "missing", "float32")


def test_redis_transport_is_refused_past_the_budget_with_the_fields_named() -> None:
    gib = 2**30
    check_weight_budget(build_config({}, []), 4 * 2**20)  # the tiny model: 4 MiB x 3 kept
    with pytest.raises(ConfigError) as info:
        check_weight_budget(build_config({}, []), 8 * gib)  # a 4B model in bf16
    msg = str(info.value)
    for needle in (
        "24,576 MiB",
        "weights.keep_versions=3",
        "weights.redis_budget_mb=2048",
        "transport=object_store",
    ):
        assert needle in msg, msg
    check_weight_budget(build_config({}, ["weights.transport=object_store"]), 8 * gib)
    check_weight_budget(build_config({}, ["weights.redis_budget_mb=30000"]), 8 * gib)


@pytest.mark.parametrize("recipe", sorted((REPO / "configs" / "paper").glob("*.yaml")), ids=lambda p: p.name)
def test_paper_recipes_keep_snapshots_out_of_redis(recipe: Path) -> None:
    cfg = load_config(recipe)
    assert cfg.weights.transport == "object_store"
    check_weight_budget(cfg, 8 * 2**30)
