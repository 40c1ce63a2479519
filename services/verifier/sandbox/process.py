"""Launch one sandboxed process tree, feed stdin, collect capped output, enforce the wall limit, kill it all.

Shared by every backend: the backend builds the command line (``nsjail ...``, ``bwrap ...`` or the
program itself) and this module runs it. Nothing goes through a shell: ``argv`` is exec'd directly.

Between fork and exec (``preexec_fn``) the child joins its per-run cgroup, sets its rlimits and, when
asked, drops to an unprivileged uid, in that order (joining a root-owned cgroup needs root). The
function uses only ``os``/``resource`` calls that take no Python-level locks, because it runs in a
forked child of a multi-threaded server.
"""

from __future__ import annotations

import contextlib
import os
import resource
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from services.verifier.sandbox.cgroups import RunCgroup
from services.verifier.sandbox.interface import Limits

_CHUNK = 1 << 16
_DRAIN_AFTER_EXIT_S = 0.25  # how long pipes may stay open after the main process exits


@dataclass(frozen=True, slots=True)
class RawRun:
    """Host-side outcome of one launch (the backend turns it into an ``ExecResult``)."""

    returncode: int | None
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    timed_out: bool
    wall_s: float


def rlimits_for(limits: Limits, *, address_space: bool, nproc: bool) -> list[tuple[int, int]]:
    """(resource, value) pairs for a launch: CPU, file size, open files, core dumps off, and optionally
    the address space (per process) and the process count (per uid: only where no pids cgroup exists)."""
    out = [
        (resource.RLIMIT_CPU, limits.cpu_seconds),
        (resource.RLIMIT_FSIZE, limits.fsize_mb << 20),
        (resource.RLIMIT_NOFILE, limits.nofile),
        (resource.RLIMIT_CORE, 0),
    ]
    if address_space:
        out.append((resource.RLIMIT_AS, limits.memory_mb << 20))
    if nproc:
        out.append((resource.RLIMIT_NPROC, limits.pids))
    return out


def make_preexec(
    cgroup: RunCgroup | None, rlimits: Sequence[tuple[int, int]], uid: int | None, gid: int | None
) -> Callable[[], None]:
    """The ``preexec_fn``: join cgroups, set rlimits, drop privileges (an exception aborts the spawn)."""
    procs = cgroup.procs_files() if cgroup is not None else ()
    limits = list(rlimits)

    def preexec() -> None:
        pid = str(os.getpid()).encode()
        for path in procs:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)
        for res, value in limits:
            resource.setrlimit(res, (value, value))
        if gid is not None:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
        if uid is not None:
            os.setresuid(uid, uid, uid)

    return preexec


def kill_tree(proc: subprocess.Popen[bytes], cgroup: RunCgroup | None) -> None:
    """SIGKILL the process group of ``proc`` and everything in its cgroup."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if cgroup is not None:
        cgroup.kill_all()


def run_process(
    argv: Sequence[str],
    *,
    cwd: str,
    env: Mapping[str, str],
    stdin: bytes,
    limits: Limits,
    preexec: Callable[[], None],
    cgroup: RunCgroup | None,
    pass_fds: Sequence[int] = (),
    grace_s: float = 0.5,
) -> RawRun:
    """Run ``argv`` until it exits or ``limits.wall_s + grace_s`` passes; the tree is dead on return.

    ``grace_s`` covers the backend's own start-up (namespace and mount set-up), so a program gets its
    full ``wall_s``. Output beyond ``limits.output_bytes`` per stream is read and discarded, so a
    program that floods stdout neither blocks nor grows the host's memory.
    """
    start = time.monotonic()
    proc = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=preexec,  # only lock-free os calls: see the module docstring
        pass_fds=tuple(pass_fds),
        close_fds=True,
    )
    try:
        out = _pump(proc, stdin, limits.output_bytes, start + limits.wall_s + grace_s)
    finally:
        kill_tree(proc, cgroup)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                pipe.close()  # type: ignore[union-attr]
        proc.wait()
    stdout, stderr, cut_out, cut_err, timed_out = out
    return RawRun(
        returncode=None if timed_out else proc.returncode,
        stdout=stdout,
        stderr=stderr,
        stdout_truncated=cut_out,
        stderr_truncated=cut_err,
        timed_out=timed_out,
        wall_s=time.monotonic() - start,
    )


def _pump(
    proc: subprocess.Popen[bytes], stdin: bytes, cap: int, deadline: float
) -> tuple[bytes, bytes, bool, bool, bool]:
    """Write stdin, read both pipes (capped), until EOF on both or the deadline; returns
    (stdout, stderr, stdout_truncated, stderr_truncated, timed_out)."""
    assert proc.stdin and proc.stdout and proc.stderr
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    cut = {fd: False for fd in bufs}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    pending = memoryview(stdin)
    if pending:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    exited_at: float | None = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                return _result(bufs, cut, proc, timed_out=True)
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > _DRAIN_AFTER_EXIT_S:
                break  # something outside the tree still holds a pipe: the tree is killed next
            for key, _ in sel.select(timeout=min(0.05, deadline - now)):
                if key.fd in bufs:
                    _read_into(sel, key.fd, bufs[key.fd], cut, cap)
                else:
                    pending = _write_some(key.fd, pending)
                    if not pending:
                        sel.unregister(key.fd)
                        proc.stdin.close()
        # Both pipes closed: wait for the main process, still bounded by the deadline.
        while proc.poll() is None:
            if time.monotonic() >= deadline:
                return _result(bufs, cut, proc, timed_out=True)
            time.sleep(0.002)
        return _result(bufs, cut, proc, timed_out=False)
    finally:
        sel.close()


def _read_into(sel: selectors.BaseSelector, fd: int, buf: bytearray, cut: dict[int, bool], cap: int) -> None:
    """Read one chunk; keep what fits under ``cap``, count the rest as truncated; EOF unregisters."""
    try:
        chunk = os.read(fd, _CHUNK)
    except BlockingIOError:
        return
    except OSError:
        chunk = b""
    if not chunk:
        sel.unregister(fd)
        return
    room = cap - len(buf)
    if room > 0:
        buf += chunk[:room]
    if len(chunk) > max(room, 0):
        cut[fd] = True


def _write_some(fd: int, pending: memoryview) -> memoryview:
    try:
        written = os.write(fd, pending[:_CHUNK])
    except BlockingIOError:
        return pending
    except (BrokenPipeError, OSError):
        return memoryview(b"")  # the program closed its stdin: the rest is dropped
    return pending[written:]


def _result(
    bufs: dict[int, bytearray], cut: dict[int, bool], proc: subprocess.Popen[bytes], *, timed_out: bool
) -> tuple[bytes, bytes, bool, bool, bool]:
    assert proc.stdout and proc.stderr
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    return bytes(bufs[out_fd]), bytes(bufs[err_fd]), cut[out_fd], cut[err_fd], timed_out
