"""What every backend does around its own command line: a fresh temp dir, a per-run cgroup, the launch,
the result, the clean-up. A backend supplies ``_command`` (argv, fds, env) and ``_verdict`` (did the
sandbox itself work?)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.verifier.sandbox.cgroups import CgroupManager, RunCgroup, shared_manager
from services.verifier.sandbox.interface import Capabilities, ExecRequest, ExecResult, Isolation
from services.verifier.sandbox.process import RawRun, run_process

log = logging.getLogger(__name__)

NOBODY = 65534  # the unprivileged uid/gid programs run as when the service runs as root
SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
_CGROUP_OVERHEAD_MB = 64  # the backend's own processes (nsjail/bwrap, the harness) share the tree limit
_SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}.get(os.uname().machine)
KEYCTL_JOIN_SESSION_KEYRING = 1
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def with_fresh_keyring(preexec: Callable[[], None]) -> Callable[[], None]:
    """``preexec`` preceded by joining a fresh anonymous session keyring, so that the run can neither read
    the keys of the service's session keyring nor leave keys there for a later run. Runs between fork and
    exec: one raw syscall, no lock taken. (The zygote's jails do the same in ``jail.py``.)"""
    if _SYS_KEYCTL is None:
        log.warning(
            "keyctl's syscall number on %s is unknown: runs share the session keyring", os.uname().machine
        )
        return preexec

    def preexec_with_keyring() -> None:
        if _libc.syscall(_SYS_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None) < 0:
            err = ctypes.get_errno()
            if err != errno.ENOSYS:  # a kernel without keys has no keyring to share
                raise OSError(err, f"keyctl(KEYCTL_JOIN_SESSION_KEYRING): {os.strerror(err)}")
        preexec()

    return preexec_with_keyring


@dataclass
class Launch:
    """A backend's command for one run. ``pass_fds`` are write ends handed to the launched process and
    closed by the host after it; ``status_fd`` is a read end whose bytes land in ``status`` afterwards."""

    argv: list[str]
    preexec: Callable[[], None]
    pass_fds: list[int] = field(default_factory=list)
    status_fd: int | None = None
    status: bytes = b""


def _drain(fd: int) -> bytes:
    data = b""
    os.set_blocking(fd, False)
    with contextlib.suppress(BlockingIOError, OSError):
        while chunk := os.read(fd, 4096):
            data += chunk
    return data


def default_tmp_base() -> str:
    """``/dev/shm`` when writable (tmpfs pages count against the run's memory cgroup, so a program cannot
    fill a disk), else the system temp dir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return str(shm)
    return tempfile.gettempdir()


class BaseSandbox:
    """Shared run loop of the backends (subclasses set ``_isolation`` and implement two hooks)."""

    _isolation: Isolation = "none"
    _namespaces: tuple[str, ...] = ()
    _helper_pids = 0  # the backend's own processes inside the run's cgroup (nsjail, bwrap's init)

    def __init__(self, *, tmp_base: str | None = None, cgroups: CgroupManager | None = None) -> None:
        """``cgroups``: a manager to use (the caller closes it); default the process-wide one."""
        self.tmp_base = tmp_base or default_tmp_base()
        self.cgroups = cgroups if cgroups is not None else shared_manager()
        self.root = os.geteuid() == 0
        self.uid = NOBODY if self.root else os.geteuid()
        self.gid = NOBODY if self.root else os.getegid()

    @property
    def isolation(self) -> Isolation:
        return self._isolation

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            isolation=self._isolation,
            namespaces=self._namespaces,
            cgroup_pids=self.cgroups.pids,
            cgroup_memory=self.cgroups.memory,
            rlimits=self._rlimit_names(),
            uid=self.uid,
        )

    def _rlimit_names(self) -> tuple[str, ...]:
        names = ["cpu", "fsize", "nofile", "core", "as"]
        if not self.cgroups.pids:
            names.append("nproc")
        return tuple(names)

    def run(self, request: ExecRequest) -> ExecResult:
        host_dir = Path(tempfile.mkdtemp(prefix="lpo-sbx-", dir=self.tmp_base))
        work = host_dir / "work"
        cgroup: RunCgroup | None = None
        try:
            # Traversable, not listable: the jail builder (and `none`'s program) runs as another uid.
            host_dir.chmod(0o711)
            work.mkdir()
            self._populate(work, request.files)
            limits = request.limits
            cgroup = self.cgroups.create(
                limits.pids + self._helper_pids, (limits.memory_mb + _CGROUP_OVERHEAD_MB) << 20
            )
            env = {**SANDBOX_ENV, "HOME": self._home(work), **request.env}
            raw, launch = self._launch(request, work, env, cgroup)
            oom = cgroup.oom_killed() if cgroup is not None else False
            return self._result(raw, launch, oom)
        except (OSError, subprocess.SubprocessError) as exc:  # incl. a failed preexec_fn (cgroup join)
            log.exception("%s sandbox failed to run %s", self._isolation, request.argv[:1])
            return ExecResult(
                status="sandbox_error",
                exit_code=None,
                signal=None,
                stdout=b"",
                stderr=b"",
                wall_s=0.0,
                isolation=self._isolation,
                detail=f"{self._isolation} sandbox could not start: {exc}",
            )
        finally:
            if cgroup is not None:
                cgroup.remove()
            shutil.rmtree(host_dir, ignore_errors=True)

    def _launch(
        self, request: ExecRequest, work: Path, env: dict[str, str], cgroup: RunCgroup | None
    ) -> tuple[RawRun, Launch]:
        """Start the backend's command (``_command``) as a child of this process and run it to the end."""
        launch = self._command(request, work, env, cgroup)
        try:
            raw = run_process(
                launch.argv,
                cwd=str(work),
                env=env if self._isolation == "none" else {"PATH": SANDBOX_ENV["PATH"]},
                stdin=request.stdin,
                limits=request.limits,
                preexec=with_fresh_keyring(launch.preexec),
                cgroup=cgroup,
                pass_fds=launch.pass_fds,
            )
        finally:
            for fd in launch.pass_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if launch.status_fd is not None:
                launch.status = _drain(launch.status_fd)
                os.close(launch.status_fd)
        return raw, launch

    def _populate(self, work: Path, files: Mapping[str, bytes]) -> None:
        for name, data in files.items():
            path = work / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        if self.root:
            for path in [work, *work.rglob("*")]:
                os.chown(path, self.uid, self.gid)

    def _home(self, work: Path) -> str:
        return "/work"

    def _result(self, raw: RawRun, launch: Launch, oom: bool) -> ExecResult:
        error = self._verdict(raw, launch)
        exit_code, sig = self._exit_status(raw, launch)
        if error and not raw.timed_out:
            status, detail = "sandbox_error", error
        elif raw.timed_out:
            status, detail = "timeout", "killed at the wall-clock limit"
        else:
            status, detail = "ok", ""
        if oom:
            detail = (detail + "; " if detail else "") + "a process was killed by the memory limit"
        return ExecResult(
            status=status,  # type: ignore[arg-type]
            exit_code=exit_code,
            signal=sig,
            stdout=raw.stdout,
            stderr=raw.stderr,
            wall_s=raw.wall_s,
            isolation=self._isolation,
            stdout_truncated=raw.stdout_truncated,
            stderr_truncated=raw.stderr_truncated,
            oom_killed=oom,
            detail=detail,
        )

    def _exit_status(self, raw: RawRun, launch: Launch) -> tuple[int | None, int | None]:
        """(exit code, signal) of the program; the default reads the launched process's return code."""
        if raw.returncode is None:
            return None, None
        if raw.returncode < 0:
            return None, -raw.returncode
        return raw.returncode, None

    def _command(
        self, request: ExecRequest, work: Path, env: dict[str, str], cgroup: RunCgroup | None
    ) -> Launch:
        raise NotImplementedError

    def _verdict(self, raw: RawRun, launch: Launch) -> str:
        """A non-empty reason when the sandbox itself failed (not the program)."""
        return ""

    def close(self) -> None:
        """Nothing to release: each run cleans up after itself, and the cgroup manager is shared (removed
        at exit) or the caller's."""
