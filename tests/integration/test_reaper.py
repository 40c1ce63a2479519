"""The embedded-Ray watcher's reaping on real processes: it ends exactly the processes carrying its token,
SIGKILLs one that ignores SIGTERM, and waits on a pidfd for its parent."""

from __future__ import annotations

import os
import subprocess
import threading
import uuid

from services.coordinator.reaper import TOKEN_VAR, marked, reap, watch


def _spawn(token: str, script: str) -> subprocess.Popen:
    return subprocess.Popen(["sh", "-c", script], env={**os.environ, TOKEN_VAR: token})


def test_reap_ends_the_marked_processes_and_only_them() -> None:
    token, other = uuid.uuid4().hex, uuid.uuid4().hex
    polite = _spawn(token, "exec sleep 600")
    stubborn = _spawn(token, "trap '' TERM; sleep 600 & wait; sleep 600")  # survives SIGTERM
    bystander = _spawn(other, "exec sleep 600")
    try:
        assert {polite.pid, stubborn.pid} <= set(marked(token))
        assert reap(token, grace_s=1.0) >= 2
        assert polite.wait(timeout=10) == -15  # SIGTERM
        assert stubborn.wait(timeout=10) == -9  # SIGKILL after the grace period
        assert bystander.poll() is None and not marked(token)
    finally:
        for proc in (polite, stubborn, bystander):
            proc.kill()
            proc.wait()


def test_watch_returns_when_the_parent_ends_and_remembers_the_marked() -> None:
    token = uuid.uuid4().hex
    parent = subprocess.Popen(["sleep", "600"])
    child = _spawn(token, "exec sleep 600")
    result: dict = {}
    done = threading.Event()
    waiter = threading.Thread(
        target=lambda: (result.update(watch(parent.pid, token, refresh_s=0.05)), done.set())
    )
    waiter.start()
    try:
        assert not done.wait(0.5)  # the parent runs: the watcher blocks
        parent.kill()
        parent.wait()
        assert done.wait(10)
        waiter.join()
        assert child.pid in result  # remembered while the parent lived
        assert watch(parent.pid, token) == {}  # an already-gone parent returns at once
    finally:
        for proc in (parent, child):
            proc.kill()
            proc.wait()
