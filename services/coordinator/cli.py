"""Command line of the coordinator (the ``ray job submit`` entrypoint): config loading and --dry-run."""

from __future__ import annotations

import argparse
import sys

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
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> RunConfig:
    """The run config, or exit 2 with the config error on stderr (no traceback for a user mistake)."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(2) from None


def dry_run(cfg: RunConfig) -> None:
    sys.stdout.write(dump_config(cfg))
