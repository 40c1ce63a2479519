"""Evaluate a model outside a run (the tools CLI, the tiny model's tests, benches) through the same parts
as a run's evaluation: ``eval_tasks`` sampled by a ``RolloutEngine``, scored by the verifier's
``score_group``, Pass@k by ``summarize``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.common.config import RunConfig, build_config
from services.common.data.problems import Problem
from services.common.messages import ResponseGroup, RolloutTask
from services.coordinator.evaluation import EvalSet, eval_tasks, reported_ks, summarize
from services.generator.interface import RolloutEngine

if TYPE_CHECKING:
    from services.generator.vllm_engine import VllmRolloutEngine

_UNTRAINED_SHA256 = "0" * 64  # behaviour hash of a model evaluated outside a run (never trained here)


def tools_config(
    seed: int = 0,
    temperature: float = 1.0,
    max_tokens: int = 64,
    max_model_len: int = 128,
    extra: Sequence[str] = (),
) -> RunConfig:
    """A default run config whose generator and evaluation settings are the given ones (``extra``: more
    ``section.field=value`` overrides)."""
    return build_config(
        {},
        [
            *extra,
            f"generator.seed={seed}",
            f"generator.max_tokens={max_tokens}",
            f"model.max_model_len={max_model_len}",
            f"coordinator.eval_temperature={temperature}",
            "coordinator.run_name=tools",
        ],
    )


def build_engine(model_dir: str | Path, cfg: RunConfig, *, in_process: bool = True) -> VllmRolloutEngine:
    """The generator's vLLM engine for ``model_dir`` with ``cfg``'s model and generator settings."""
    from services.generator.vllm_engine import VllmRolloutEngine

    return VllmRolloutEngine(
        model_dir, cfg.model, cfg.generator, seed=cfg.generator.seed, in_process=in_process
    )


def prompt_ids(model_dir: str | Path, problems: Sequence[Problem]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return [tokenizer(p.prompt)["input_ids"] for p in problems]


def sample_tasks(engine: RolloutEngine, tasks: Sequence[RolloutTask]) -> list[ResponseGroup]:
    """The engine's groups for ``tasks`` (unscored), as a generator would forward them."""
    return [
        ResponseGroup(task=t, rollouts=tuple(r), behavior_version=0, behavior_sha256=_UNTRAINED_SHA256)
        for t, r in zip(tasks, engine.generate(tasks), strict=True)
    ]


def evaluate_engine(
    engine: RolloutEngine,
    cfg: RunConfig,
    problems: Sequence[Problem],
    prompts: Sequence[Sequence[int]],
    samples: int,
) -> dict[str, Any]:
    """Pass@k (k = 1, 8, the largest power of two <= ``samples``) of the engine's weights on
    ``problems`` (scored by the rule of their kind) (``prompts``: their token ids), ``samples`` per problem at
    ``cfg.coordinator.eval_temperature``; deterministic in ``cfg.generator.seed``."""
    from services.verifier.scoring import score_group

    tasks = eval_tasks(cfg, EvalSet("heldout", tuple(problems), samples), prompts, step=0, version=0)
    return summarize([score_group(g) for g in sample_tasks(engine, tasks)], reported_ks(samples))
