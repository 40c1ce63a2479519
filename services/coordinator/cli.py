"""Command line of the coordinator (the ``ray job submit`` entrypoint): config, --resume, --dry-run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.common.config import ConfigError, RunConfig, dump_config, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.coordinator",
        description="Run asynchronous LPO training: defaults < --config YAML < --set overrides.",
    )
    parser.add_argument("--config", default=None, help="run config YAML (e.g. configs/countdown-tiny.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one field, e.g. --set learner.lr=1e-5 (repeatable)",
    )
    parser.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue the killed run in RUN_DIR (e.g. runs/countdown-tiny) with its config.yaml, from its "
        "last checkpoint; --set may still override fields (e.g. coordinator.steps to extend it)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> RunConfig:
    """The run config, or exit 2 with the config error on stderr (no traceback for a user mistake)."""
    try:
        if args.resume is None:
            return load_config(args.config, args.overrides)
        run_dir = Path(args.resume)
        if args.config is not None:
            raise ConfigError(
                "--resume uses the run directory's config.yaml; drop --config (use --set to change a field)"
            )
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(
                f"--resume {run_dir}: no config.yaml there; give the run directory, e.g. runs/countdown-tiny"
            )
        where = [f"coordinator.runs_dir={run_dir.resolve().parent}", f"coordinator.run_name={run_dir.name}"]
        return load_config(str(run_dir / "config.yaml"), [*args.overrides, *where])
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(2) from None


def dry_run(cfg: RunConfig) -> None:
    sys.stdout.write(dump_config(cfg))
