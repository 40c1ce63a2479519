"""An embedded redis-server dies with the process that started it, even when that process is SIGKILLed
(``PR_SET_PDEATHSIG``), except the persistent one a run keeps in its directory: that one stays up on its
AOF for ``--resume`` to stop and reopen (``test_queue.py`` checks the reopening)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

REPO = Path(__file__).resolve().parents[2]
# The owner: starts the server the way the verifier (no data_dir) or a run (data_dir) does, prints its pid
# and URL, then waits to be killed.
OWNER = """
import sys, time
from services.common.redis_server import connect
url, server = connect("embedded", data_dir=sys.argv[1] or None)
print(server.pid, url, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("persistent", [False, True], ids=["private", "run-directory"])
def test_a_sigkilled_owner_takes_its_private_server_along(tmp_path: Path, persistent: bool) -> None:
    data_dir = str(tmp_path / "redis") if persistent else ""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, data_dir], env=env, stdout=subprocess.PIPE, text=True
    )
    pid = 0
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline()
        assert line, f"the owner exited with {owner.wait()} before starting redis"
        pid, url = int(line.split()[0]), line.split()[1]
        redis.Redis.from_url(url).set("k", "v")
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 20
        while _alive(pid) and not persistent:
            assert time.monotonic() < deadline, f"redis-server {pid} outlived its SIGKILLed owner by 20 s"
            time.sleep(0.05)
        if persistent:  # the run's server keeps serving its data until the resumed run takes over
            # A parent-death signal is sent during the owner's exit, before wait() returns, and redis acts
            # on a SIGTERM at its next cron tick (100 ms): a 0.5 s blocking read spans several ticks.
            client = redis.Redis.from_url(url)
            assert client.blpop(["nothing"], timeout=0.5) is None and client.get("k") == b"v"
            assert _alive(pid)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if pid and _alive(pid):
            os.kill(pid, signal.SIGTERM)
