"""The ``zygote`` backend (the fast path): one warm interpreter forks a fresh jail per execution.

nsjail and bwrap pay per execution for an ``execve`` of the jail binary, its set-up, and a cold start of
the Python interpreter (~10 ms of CPU before the program's first line). Here a zygote process
(``jail.py``) is started once, by a clean ``execve`` of ``verifier.python`` with a scrubbed environment,
and pre-imports the standard modules programs use. Per execution the host does what every backend does
(fresh temp dir, per-run pids + memory cgroup, the wall limit, the kill, the clean-up) and hands the
zygote five descriptors; the zygote forks a jail that joins the cgroup and unshares new mount, pid, ipc
and uts namespaces and mounts its own ``/proc``, ``/tmp`` and ``/work`` on a read-only root the zygote
built once, in a loopback-only network namespace used by no other
execution at the time and untouched by any earlier one, so each execution still gets the isolation of the
``nsjail`` backend (jail.py's docstring lists it). What is reused, and why that is safe,
is in docs/VERIFIER.md ("What the zygote reuses").

Needs root (to create namespaces without a user namespace and join the run's cgroup) and pids + memory
cgroups (the only way to bound and kill a run's process tree wherever it forks or ``setsid``s to). Each
execution runs as a host uid/gid of its own (``_next_run_id``), 65534 inside its user namespace.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import marshal
import os
import secrets
import selectors
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from services.verifier.sandbox.base import SANDBOX_ENV, BaseSandbox, Launch
from services.verifier.sandbox.cgroups import CgroupManager, RunCgroup
from services.verifier.sandbox.interface import ExecRequest, Limits, SandboxUnavailableError
from services.verifier.sandbox.process import RawRun, _read_into, _write_some, rlimits_for

log = logging.getLogger(__name__)

JAIL_SCRIPT = Path(__file__).with_name("jail.py")
_ZYGOTE_ENV = {"PATH": SANDBOX_ENV["PATH"], "LANG": "C.UTF-8"}  # nothing of the service's environment
_GRACE_S = 0.5  # jail set-up time on top of the program's wall limit (as for nsjail/bwrap)
_BACKSTOP_S = 3.0  # the zygote's own kill past the wall limit, should the host never kill the run
# Each execution runs as a host uid/gid of its own (65534 inside its user namespace), so that no other
# process on the host shares the uid that may signal, trace or read it. Taken in turn from a range no
# account uses (above the usual subordinate-id ranges of rootless containers); a random start makes two
# services on one host unlikely to meet, and one service would need 2**16 executions in flight to hand
# out an id twice.
_RUN_ID_BASE, _RUN_ID_SPAN = 1 << 30, 1 << 16
_run_ids = itertools.count(secrets.randbelow(_RUN_ID_SPAN))
_run_ids_lock = threading.Lock()


def _next_run_id() -> int:
    with _run_ids_lock:
        return _RUN_ID_BASE + next(_run_ids) % _RUN_ID_SPAN


class Zygote:
    """The zygote process and our end of its control socket. ``send`` is thread-safe and restarts a
    zygote that died; nothing ever comes back on the socket (each run reports on its own status pipe)."""

    def __init__(self, python: str, template: str) -> None:
        self.python, self.template = python, template
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self.starts = 0
        self._start()

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [self.python, "-I", "-B", str(JAIL_SCRIPT), str(theirs.fileno()), self.template],
                env=_ZYGOTE_ENV,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=[theirs.fileno()],
                close_fds=True,
                start_new_session=True,  # a Ctrl-C to the service's terminal is not the zygote's
                cwd="/",
            )
        finally:
            theirs.close()
        self._sock = ours
        self.starts += 1

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def send(self, fds: list[int], backstop_s: float) -> None:
        """Ask for one execution (the zygote SIGKILLs it after ``backstop_s`` should the host not have);
        raises ``OSError`` when the zygote is gone and cannot be restarted."""
        with self._lock:
            for attempt in (0, 1):
                try:
                    assert self._sock is not None
                    socket.send_fds(self._sock, [b"run %.3f" % backstop_s], fds)
                    return
                except OSError:
                    if attempt:
                        raise
                    log.warning("zygote pid %s is gone (exit %s); starting a new one", self.pid, self._exit())
                    self._stop()
                    self._start()

    def _exit(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def _stop(self) -> None:
        if self._sock is not None:
            self._sock.close()  # the zygote's recv sees EOF and it exits
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def close(self) -> None:
        with self._lock:
            self._stop()


class ZygoteSandbox(BaseSandbox):
    """Runs each request in a fresh jail forked from a warm zygote (see the module docstring)."""

    _isolation = "zygote"
    _namespaces = ("user", "pid", "mount", "net", "ipc", "uts")
    _helper_pids = 0  # the program is the jail's pid 1: no helper process in the run's cgroup

    def __init__(
        self,
        *,
        python: str = "/usr/bin/python3",
        tmp_base: str | None = None,
        cgroups: CgroupManager | None = None,
    ) -> None:
        super().__init__(tmp_base=tmp_base, cgroups=cgroups)
        if not self.root:
            raise SandboxUnavailableError(
                "the zygote backend needs root (it builds each jail's namespaces and mounts as root and "
                "joins per-run cgroups); run the service as root or choose --set verifier.sandbox=nsjail"
            )
        if not (self.cgroups.pids and self.cgroups.memory):
            raise SandboxUnavailableError(
                "the zygote backend needs pids and memory cgroups "
                f"({self.cgroups.reason or 'not available'}); "
                "choose --set verifier.sandbox=nsjail"
            )
        if not os.path.exists(python):
            raise SandboxUnavailableError(
                f"zygote interpreter {python!r} does not exist; set verifier.python"
            )
        self.python = python
        # where the zygote mounts the jails' read-only root, in its own mount namespace: an empty directory
        # on the host
        self.template = tempfile.mkdtemp(prefix="lpo-zygote-root-", dir=self.tmp_base)
        self.zygote = Zygote(python, self.template)
        self._net_lock = threading.Lock()
        self._netns = {"new": 0, "reused": 0, "dropped": 0}  # from the runs' status lines

    def _rlimit_names(self) -> tuple[str, ...]:
        return ("as", "cpu", "fsize", "nofile", "nproc", "core")  # nproc counts per run: own user namespace

    def describe(self) -> dict[str, object]:
        """What ``/healthz`` shows about the fast path: the zygote's pid and interpreter, restarts."""
        with self._net_lock:
            netns = dict(self._netns)
        return {
            "zygote_pid": self.zygote.pid,
            "python": self.python,
            "zygote_starts": self.zygote.starts,
            "netns": netns,  # network namespaces made, reused, and dropped after a run that used the network
        }

    def _launch(
        self, request: ExecRequest, work: Path, env: dict[str, str], cgroup: RunCgroup | None
    ) -> tuple[RawRun, Launch]:
        assert cgroup is not None  # the constructor refused a machine without cgroups
        limits = request.limits
        host_id = _next_run_id()
        for path in [work, *work.rglob("*")]:
            os.chown(path, host_id, host_id, follow_symlinks=False)
        spec = {
            "argv": list(request.argv),
            "env": env,
            "work": str(work),
            "hostname": "sandbox",
            "cgroup_procs": list(cgroup.procs_files()),
            "uid": self.uid,  # inside the run's user namespace (65534)
            "host_uid": host_id,  # outside it, uid and gid
            "rlimits": rlimits_for(limits, address_space=True, nproc=False),
            "nproc": limits.pids,  # counted in the execution's own user namespace
        }
        spec_fd = os.memfd_create("lpo-zygote-spec", os.MFD_CLOEXEC)
        pipes = [os.pipe() for _ in range(4)]  # stdin, stdout, stderr, status: (read end, write end)
        theirs = [spec_fd, pipes[0][0], pipes[1][1], pipes[2][1], pipes[3][1]]
        stdin_w, ours = pipes[0][1], [pipes[1][0], pipes[2][0], pipes[3][0]]
        try:
            os.write(spec_fd, marshal.dumps(spec, 4))
            launch = Launch(argv=list(request.argv), preexec=lambda: None)
            start = time.monotonic()
            self.zygote.send(theirs, backstop_s=limits.wall_s + _GRACE_S + _BACKSTOP_S)
            for fd in theirs:
                os.close(fd)
            theirs = []
            handed, stdin_w = stdin_w, -1  # _pump owns it from here (it closes it once stdin is written)
            raw = _pump(
                [handed, *ours], request.stdin, limits, start + limits.wall_s + _GRACE_S, cgroup, launch
            )
            self._count_netns(_status(launch))
            return raw, launch
        finally:
            for fd in [*theirs, *ours, stdin_w]:
                if fd >= 0:
                    os.close(fd)

    def _count_netns(self, status: dict[str, object]) -> None:
        if status.get("netns") not in ("new", "reused"):
            return  # a run cut short before the zygote reaped it
        with self._net_lock:
            self._netns[str(status["netns"])] += 1
            self._netns["dropped"] += status.get("netns_kept") is False

    def _verdict(self, raw: RawRun, launch: Launch) -> str:
        status = _status(launch)
        if "error" in status:
            return f"zygote jail failed: {status['error']}"
        if "exit" not in status and "signal" not in status and not raw.timed_out:
            return "zygote jail ended without reporting the program's exit status"
        return ""

    def _exit_status(self, raw: RawRun, launch: Launch) -> tuple[int | None, int | None]:
        status = _status(launch)
        if raw.timed_out:
            return None, None
        if "signal" in status:
            return None, int(status["signal"])
        if "exit" in status:
            return int(status["exit"]), None
        return None, None

    def close(self) -> None:
        """Stop the zygote (its in-flight jails end at their own wall limits or the host's kill)."""
        self.zygote.close()
        with contextlib.suppress(OSError):
            os.rmdir(self.template)


def _status(launch: Launch) -> dict[str, object]:
    merged: dict[str, object] = {}
    for line in launch.status.decode(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            merged.update(json.loads(line))
    return merged


def _pump(
    fds: list[int], stdin: bytes, limits: Limits, deadline: float, cgroup: RunCgroup, launch: Launch
) -> RawRun:
    """Feed stdin, read stdout/stderr (capped) and the status pipe until all three reach EOF (the jail's
    init and jailer have exited, so nothing of the run is left) or the deadline (then the cgroup is
    killed). The status pipe's bytes land in ``launch.status``."""
    start = time.monotonic()
    stdin_w, out_r, err_r, status_r = fds
    bufs = {out_r: bytearray(), err_r: bytearray(), status_r: bytearray()}
    cut = dict.fromkeys(bufs, False)
    timed_out = False
    sel = selectors.DefaultSelector()
    try:
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        pending = memoryview(stdin)
        if pending:
            os.set_blocking(stdin_w, False)
            sel.register(stdin_w, selectors.EVENT_WRITE)
        else:
            os.close(stdin_w)
            stdin_w = -1
        while any(fd in bufs for fd in sel.get_map()):
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            for key, _ in sel.select(timeout=deadline - now):
                if key.fd in bufs:
                    cap = 1 << 16 if key.fd == status_r else limits.output_bytes
                    _read_into(sel, key.fd, bufs[key.fd], cut, cap)
                else:
                    pending = _write_some(key.fd, pending)
                    if not pending:
                        sel.unregister(key.fd)
                        os.close(stdin_w)
                        stdin_w = -1
    finally:
        sel.close()
        if stdin_w >= 0:
            os.close(stdin_w)
        if timed_out:
            cgroup.kill_all()
    launch.status = bytes(bufs[status_r])
    return RawRun(
        returncode=None,
        stdout=bytes(bufs[out_r]),
        stderr=bytes(bufs[err_r]),
        stdout_truncated=cut[out_r],
        stderr_truncated=cut[err_r],
        timed_out=timed_out,
        wall_s=time.monotonic() - start,
    )
