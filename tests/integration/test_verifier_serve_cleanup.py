"""``python -m services.verifier serve`` takes its embedded redis-server with it when it stops: on SIGTERM
(uvicorn shuts down and re-raises the signal; the server is stopped before the process ends by it) and on
SIGKILL (the kernel's parent-death signal). Every restart of a leaky service would leave one behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from services.common.redis_server import free_port
from services.verifier.app import API_KEYS_ENV

REPO = Path(__file__).resolve().parents[2]


def _stat(pid: int) -> list[str] | None:
    """Fields after the command name of /proc/<pid>/stat (state first), None once the pid is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has exited


def _redis_children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if fields is not None and fields[1] == str(parent) and comm == "redis-server":
            found.append(int(entry.name))
    return found


def _wait(condition: object, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f}s"
        time.sleep(0.05)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_the_embedded_redis_dies_with_the_service(stop: signal.Signals) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "services.verifier", "serve", "--host", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != API_KEYS_ENV} | {"PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    redis_pids: list[int] = []
    try:

        def healthy() -> bool:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        _wait(healthy, "the service became healthy", 90)
        redis_pids = _redis_children(proc.pid)
        assert len(redis_pids) == 1, f"expected one redis-server child of {proc.pid}, found {redis_pids}"
        [redis_pid] = redis_pids
        data_dir = Path(os.readlink(f"/proc/{redis_pid}/cwd"))  # redis-server runs in its --dir
        assert data_dir.name.startswith("lpo-redis-"), data_dir

        proc.send_signal(stop)
        output = proc.communicate(timeout=60)[0].decode(errors="replace")
        assert proc.returncode == -stop, output[-3000:]  # the exit status still names the signal
        _wait(
            lambda: not _alive(redis_pid),
            f"redis-server {redis_pid} exited after the service's {stop.name}",
            20,
        )
        if stop == signal.SIGTERM:  # stopped by the service itself: its temporary directory is gone too
            assert not data_dir.exists(), data_dir
            assert "stopped on SIGTERM" in output, output[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in redis_pids:  # a failed run must not leak the very process it checks for
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
