"""The ``none`` backend: no namespaces, rlimits only (plus the per-run cgroup where one is available).

The program runs directly on the host in the fresh temp dir, as uid 65534 when the service is root, in
its own session, with address-space, CPU, file-size and open-file rlimits. It can see the host's
filesystem and network: results are reported as ``isolation: none`` and the training loop refuses this
backend for code tasks unless ``verifier.allow_unsandboxed_code`` is set.
"""

from __future__ import annotations

from pathlib import Path

from services.verifier.sandbox.base import BaseSandbox, Launch
from services.verifier.sandbox.cgroups import RunCgroup
from services.verifier.sandbox.interface import ExecRequest
from services.verifier.sandbox.process import make_preexec, rlimits_for


class NoneSandbox(BaseSandbox):
    """Runs each request as a plain child process with rlimits."""

    _isolation = "none"
    _namespaces = ()

    def _home(self, work: Path) -> str:
        return str(work)

    def _command(
        self, request: ExecRequest, work: Path, env: dict[str, str], cgroup: RunCgroup | None
    ) -> Launch:
        rlimits = rlimits_for(request.limits, address_space=True, nproc=not self.cgroups.pids)
        uid, gid = (self.uid, self.gid) if self.root else (None, None)
        return Launch(list(request.argv), make_preexec(cgroup, rlimits, uid, gid))
