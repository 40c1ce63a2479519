"""Project command-line tools: ``python -m services.tools <command> ...``.

Commands:
  build-tiny   build (or reuse) a tiny base model (``--task countdown`` or ``code``) and report its base
               Pass@1 with vLLM; ``--task code`` also writes the code task's data files (data/code-tiny).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

from services.common.paths import set_cache_env

logger = logging.getLogger("lpo.tools")


def _build_tiny(args: argparse.Namespace) -> int:
    from services.common.tiny import TinySpec, build_tiny, default_model_dir, is_complete
    from services.common.tiny_code import CodeTinySpec

    base = CodeTinySpec() if args.task == "code" else TinySpec()
    spec = base if args.seed is None else replace(base, seed=args.seed)
    if args.task == "code":
        from services.common.tiny_code import DATA_DIR, data_is_current, write_data

        if not data_is_current(spec):
            logger.info("writing the tiny code task's data: %s", sorted(map(str, write_data(spec).values())))
        else:
            logger.info("tiny code task data up to date in %s", DATA_DIR)
    reused = not args.force and is_complete(args.out or default_model_dir(spec), spec)
    started = time.perf_counter()
    model_dir = build_tiny(args.out, spec, force=args.force)
    logger.info("tiny model: %s (%.0fs)", model_dir, time.perf_counter() - started)
    if not args.eval:
        return 0

    from services.tools.evaluate import build_engine, evaluate_engine, prompt_ids, tools_config

    cfg = tools_config(
        seed=args.eval_seed,
        temperature=args.temperature,
        max_tokens=160 if args.task == "code" else 64,
        max_model_len=spec.max_position_embeddings,
        extra=_code_overrides() if args.task == "code" else (),
    )
    problems = _heldout(args.task, spec, args.problems)
    # In-process vLLM starts ~15 s faster, but after SFT ran in this process it samples ~3x slower
    # (torch/OMP state left by training); then the engine's own child processes are faster overall.
    engine = build_engine(model_dir, cfg, in_process=reused)
    try:
        result = evaluate_engine(engine, cfg, problems, prompt_ids(model_dir, problems), args.samples)
    finally:
        engine.shutdown()
    result |= {"temperature": args.temperature, "seed": args.eval_seed}
    (model_dir / "base_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    k = max(result["pass_at"], key=int)
    logger.info(
        "base Pass@1 = %.4f (Pass@%s = %.4f, mean reward = %.4f)",
        result["pass_at"]["1"],
        k,
        result["pass_at"][k],
        result["mean_reward"],
    )
    return 0


def _code_overrides() -> list[str]:
    from services.common.tiny_code import DATA_DIR, SPLIT_FILES

    return [
        "model.path=tiny:code",
        "data.task=code",
        f"data.train_path={DATA_DIR / SPLIT_FILES['train']}",
        f"data.eval_path={DATA_DIR / SPLIT_FILES['heldout']}",
    ]


def _heldout(task: str, spec: object, n: int) -> list:
    from services.common.data.problems import code_problem, countdown_problem

    if task == "code":
        from services.common.tiny_code import heldout_problems as code_heldout

        return [code_problem(p) for p in code_heldout(n)]
    from services.common.tiny import heldout_problems

    return [countdown_problem(p) for p in heldout_problems(n, spec=spec)]  # type: ignore[arg-type]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.tools", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("build-tiny", help="build a tiny model and evaluate its base Pass@1")
    tiny.add_argument("--task", choices=("countdown", "code"), default="countdown", help="which tiny model")
    tiny.add_argument("--out", type=Path, default=None, help="model folder (default: the spec-hashed cache)")
    tiny.add_argument("--seed", type=int, default=None, help="TinySpec.seed (weights, batch order)")
    tiny.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    tiny.add_argument(
        "--eval", action=argparse.BooleanOptionalAction, default=True, help="evaluate with vLLM afterwards"
    )
    tiny.add_argument("--problems", type=int, default=256, help="held-out problems to evaluate")
    tiny.add_argument("--samples", type=int, default=8, help="samples per problem (k of Pass@k)")
    tiny.add_argument("--temperature", type=float, default=1.0)
    tiny.add_argument("--eval-seed", type=int, default=0, help="sampling seed of the evaluation")
    tiny.set_defaults(func=_build_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_cache_env()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
