"""``python -m services.verifier serve --host H --port P``: run the verifier REST service with uvicorn.

The verifier section of the run config applies (``--config``, ``--set verifier.x=y``). Without an API key
(``verifier.api_keys`` or ``LPO_VERIFIER_API_KEYS``) the service refuses to bind a non-loopback address.
``--redis-url embedded`` (the default) starts a private redis-server for ``/v1/tasks``; it stops with the
service on SIGINT or SIGTERM (uvicorn shuts down, then the server is stopped and the signal re-delivered,
so the exit status still says SIGTERM) and, through the kernel, when the service is SIGKILLed.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
from types import FrameType

from services.common.config import ConfigError, VerifierConfig, load_config
from services.common.logs import setup_logging


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(cfg: VerifierConfig, host: str) -> None:
    """Refuse (``ConfigError``) a non-loopback bind without API keys."""
    from services.verifier.app import API_KEYS_ENV, api_keys

    if not api_keys(cfg) and not is_loopback(host):
        raise ConfigError(
            f"refusing to bind {host!r} without an API key: set {API_KEYS_ENV}=key1,key2 or "
            "verifier.api_keys, or bind a loopback address such as 127.0.0.1"
        )


class _Terminated(BaseException):
    """SIGTERM arrived: unwinds ``main`` through its ``finally`` (which stops Redis and the sandbox). Not an
    ``Exception``, like ``KeyboardInterrupt``: an ``except Exception`` on the way must not swallow it."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # uvicorn handles SIGTERM itself while serving, then restores this handler and raises the signal again:
    # without it the default action would end the process before main's `finally` could run.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise _Terminated


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.verifier", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the REST service (uvicorn)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8077, help="TCP port (default 8077)")
    serve.add_argument("--config", default=None, help="run config YAML (its verifier section applies)")
    serve.add_argument("--set", action="append", default=[], metavar="verifier.KEY=VALUE", help="override")
    serve.add_argument("--redis-url", default="embedded", help="redis:// URL, 'embedded' or 'none'")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log = setup_logging("verifier-api")
    try:
        cfg = load_config(args.config, args.set).verifier
        check_bind(cfg, args.host)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    import uvicorn

    from services.common.redis_server import connect
    from services.verifier.app import create_app
    from services.verifier.sandbox.interface import SandboxUnavailableError
    from services.verifier.sandbox.probe import select_sandbox

    try:  # probe before uvicorn starts, so a missing sandbox is a clear error and exit code 2
        sandbox, _ = select_sandbox(
            cfg.sandbox, fallback=cfg.sandbox_fallback, python=cfg.python, tmp_base=cfg.tmp_dir
        )
    except SandboxUnavailableError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    server = None
    redis_url = None
    terminated = False
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.redis_url != "none":
            redis_url, server = connect(args.redis_url)
        app = create_app(cfg, sandbox=sandbox, redis_url=redis_url)
        log.info("serving on http://%s:%d (backend %s)", args.host, args.port, sandbox.isolation)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", lifespan="on")
    except _Terminated:
        terminated = True
    finally:
        sandbox.close()
        if server is not None:
            server.stop()
    if terminated:  # end the way uvicorn meant to: by the signal, now that everything is stopped
        log.info("stopped on SIGTERM")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)
    return 0


if __name__ == "__main__":
    sys.exit(main())
