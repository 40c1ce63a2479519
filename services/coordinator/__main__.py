"""``python -m services.coordinator --config FILE [--set k=v ...] [--dry-run]`` or ``--resume RUN_DIR``.

Exit status: 0 done; 2 a config error; 3 a stage stalled (the watchdog); 4 the learner died (continue
with ``--resume``); 5 the Redis state does not fit the run (a fresh run over an old one's keys)."""

import logging
from pathlib import Path

from services.common.config import ConfigError
from services.coordinator.cli import dry_run, parse_args, resolve


def main() -> None:
    args = parse_args()
    cfg = resolve(args)
    if args.dry_run:
        dry_run(cfg)
        return
    from services.coordinator.driver import RunStateError, run  # heavy imports only when running
    from services.coordinator.watchdog import RunStalled
    from services.learner.group import LearnerDied

    log = logging.getLogger("lpo.coordinator")
    run_dir = Path(cfg.coordinator.runs_dir) / cfg.coordinator.run_name
    try:
        run(cfg, resume=args.resume is not None)
    except RunStalled as exc:  # a stuck stage: say which, exit non-zero (everything started is stopped)
        log.error("run stalled: %s", exc)
        raise SystemExit(3) from None
    except LearnerDied as exc:
        log.error("%s; continue the run with: python -m services.coordinator --resume %s", exc, run_dir)
        raise SystemExit(4) from None
    except RunStateError as exc:
        log.error("%s", exc)
        raise SystemExit(5) from None
    except ConfigError as exc:  # found once the model is known (e.g. its snapshots exceed a budget)
        log.error("%s", exc)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
