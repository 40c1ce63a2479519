"""``python -m services.coordinator --config FILE [--set k=v ...] [--dry-run]``."""

import logging

from services.coordinator.cli import dry_run, parse_args, resolve


def main() -> None:
    args = parse_args()
    cfg = resolve(args)
    if args.dry_run:
        dry_run(cfg)
        return
    from services.coordinator.driver import run  # heavy imports (ray, torch) only when running
    from services.coordinator.watchdog import RunStalled

    try:
        run(cfg)
    except RunStalled as exc:  # a stuck stage: say which, exit non-zero (everything started is stopped)
        logging.getLogger("lpo.coordinator").error("run stalled: %s", exc)
        raise SystemExit(3) from None


if __name__ == "__main__":
    main()
