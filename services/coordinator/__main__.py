"""``python -m services.coordinator --config FILE [--set k=v ...] [--dry-run]``."""

from services.coordinator.cli import dry_run, parse_args, resolve


def main() -> None:
    args = parse_args()
    cfg = resolve(args)
    if args.dry_run:
        dry_run(cfg)
        return
    from services.coordinator.driver import run  # heavy imports (ray, torch) only when running

    run(cfg)


if __name__ == "__main__":
    main()
