"""The ``bwrap`` backend: Debian's ``bubblewrap`` plus a per-run pids/memory cgroup and rlimits.

bwrap is started as the unprivileged uid 65534 (when the service is root) and builds the jail in its own
user namespace: new user, pid, mount, network (only ``lo``), ipc, uts and cgroup namespaces, all
capabilities dropped, read-only system binds, a minimal ``/dev``, a fresh ``/proc``, a tmpfs ``/tmp`` and
the fresh work dir at ``/work``. bwrap has no resource limits of its own, so they are applied before it
starts: the per-run cgroup (pids, memory; as root RLIMIT_NPROC alone would not bound a fork bomb) and
rlimits (address space, CPU, file size, open files). ``--die-with-parent`` and the pid namespace take the
whole tree down with bwrap.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from services.verifier.sandbox.base import BaseSandbox, Launch
from services.verifier.sandbox.cgroups import CgroupManager, RunCgroup
from services.verifier.sandbox.interface import ExecRequest, SandboxUnavailableError
from services.verifier.sandbox.process import RawRun, make_preexec, rlimits_for

SYSTEM_DIRS = ("/usr", "/bin", "/lib", "/lib64", "/sbin")


def find_bwrap() -> str:
    """``bwrap`` from PATH (Debian package ``bubblewrap``)."""
    found = shutil.which("bwrap")
    if not found:
        raise SandboxUnavailableError(
            "bwrap not found on PATH: install it (apt-get install bubblewrap) or choose another backend "
            "with --set verifier.sandbox=nsjail"
        )
    return found


def _status(launch: Launch) -> dict[str, int]:
    """bwrap's ``--json-status-fd`` lines merged: ``child-pid`` once cloned, ``exit-code`` at the end."""
    merged: dict[str, int] = {}
    for line in launch.status.decode(errors="replace").splitlines():
        try:
            merged.update(json.loads(line))
        except ValueError:
            continue
    return merged


class BwrapSandbox(BaseSandbox):
    """Runs each request under ``bwrap --unshare-all``."""

    _isolation = "bwrap"
    _namespaces = ("user", "pid", "mount", "net", "ipc", "uts", "cgroup")
    _helper_pids = 2

    def __init__(
        self, *, binary: str | None = None, tmp_base: str | None = None, cgroups: CgroupManager | None = None
    ) -> None:
        super().__init__(tmp_base=tmp_base, cgroups=cgroups)
        self.binary = binary or find_bwrap()

    def _command(
        self, request: ExecRequest, work: Path, env: dict[str, str], cgroup: RunCgroup | None
    ) -> Launch:
        argv = [self.binary, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
        argv += ["--hostname", "sandbox", "--uid", "65534", "--gid", "65534"]
        for path in SYSTEM_DIRS:
            if os.path.islink(path):
                argv += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                argv += ["--ro-bind", path, path]
        argv += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
        argv += ["--bind", str(work), "/work", "--chdir", "/work", "--clearenv"]
        argv += [arg for key, value in env.items() for arg in ("--setenv", key, value)]
        status_read, status_write = os.pipe()
        argv += ["--json-status-fd", str(status_write), "--", *request.argv]
        rlimits = rlimits_for(request.limits, address_space=True, nproc=not self.cgroups.pids)
        uid, gid = (self.uid, self.gid) if self.root else (None, None)
        return Launch(argv, make_preexec(cgroup, rlimits, uid, gid), [status_write], status_fd=status_read)

    def _verdict(self, raw: RawRun, launch: Launch) -> str:
        # bwrap writes "child-pid" before building the jail and "exit-code" only once the program ran.
        if "exit-code" in _status(launch):
            return ""
        tail = raw.stderr.decode(errors="replace").strip().splitlines()[-3:]
        return f"bwrap did not start the program (exit {raw.returncode}): {' | '.join(tail) or 'no message'}"

    def _exit_status(self, raw: RawRun, launch: Launch) -> tuple[int | None, int | None]:
        code = _status(launch).get("exit-code")
        if raw.timed_out or code is None:
            return super()._exit_status(raw, launch)
        # bwrap reports a signal death as 128 + signal number, like a shell.
        return (None, code - 128) if code > 128 else (code, None)
