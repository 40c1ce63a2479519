"""Sandboxes for untrusted programs: one interface, four backends chosen by config and probed at start-up.

``zygote`` (the fast path: fresh namespaces forked from a warm interpreter), ``nsjail`` and ``bwrap``
isolate with namespaces plus cgroup and rlimit limits; ``none`` only sets rlimits. ``select_sandbox``
probes the configured backend with a canary and refuses clearly when it does not work (docs/VERIFIER.md).
"""

from services.verifier.sandbox.interface import (
    BACKENDS,
    ISOLATING_BACKENDS,
    Capabilities,
    ExecRequest,
    ExecResult,
    Isolation,
    Limits,
    Sandbox,
    SandboxUnavailableError,
)
from services.verifier.sandbox.probe import (
    ProbeResult,
    build_backend,
    describe,
    probe_all,
    probe_backend,
    select_sandbox,
)

__all__ = [
    "BACKENDS",
    "ISOLATING_BACKENDS",
    "Capabilities",
    "ExecRequest",
    "ExecResult",
    "Isolation",
    "Limits",
    "ProbeResult",
    "Sandbox",
    "SandboxUnavailableError",
    "build_backend",
    "describe",
    "probe_all",
    "probe_backend",
    "select_sandbox",
]
