"""The sandbox interface: run one program in a fresh, isolated working directory and report what happened.

Every backend (``zygote``, ``nsjail``, ``bwrap``, ``none``) takes the same ``ExecRequest`` and returns the
same ``ExecResult``. Backend detail (command lines, namespaces, cgroups) stays in the backend modules.

Inside the sandbox the working directory is ``/work`` (isolating backends) or the fresh host temp dir
(``none``); ``ExecRequest.argv`` names files there by relative path and the interpreter by absolute path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

ExecStatus = Literal["ok", "timeout", "sandbox_error"]
Isolation = Literal["zygote", "nsjail", "bwrap", "none"]
# The order fallback tries them in: the long-standing binaries first, then the fast path.
ISOLATING_BACKENDS: tuple[Isolation, ...] = ("nsjail", "bwrap", "zygote")
BACKENDS: tuple[Isolation, ...] = ("nsjail", "bwrap", "zygote", "none")


class SandboxUnavailableError(RuntimeError):
    """The configured backend cannot run on this machine; the message says why and what to set instead."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-execution limits. ``cpu_s`` None means ``wall_s`` rounded up plus 2 s; ``memory_mb`` bounds the
    whole process tree where a memory cgroup is available and each process's address space otherwise."""

    wall_s: float = 10.0
    memory_mb: int = 512
    pids: int = 64
    fsize_mb: int = 16
    output_bytes: int = 1 << 20
    nofile: int = 64
    cpu_s: float | None = None

    def __post_init__(self) -> None:
        checks = {
            "wall_s": (self.wall_s, 0.01, 3600.0),
            "memory_mb": (self.memory_mb, 16, 1 << 20),
            "pids": (self.pids, 1, 1 << 16),
            "fsize_mb": (self.fsize_mb, 1, 1 << 20),
            "output_bytes": (self.output_bytes, 1, 1 << 30),
            "nofile": (self.nofile, 8, 1 << 16),
        }
        for name, (value, low, high) in checks.items():
            if not low <= value <= high:
                raise ValueError(f"Limits.{name}={value!r} is out of range; it must lie in [{low}, {high}]")
        if self.cpu_s is not None and not 0 < self.cpu_s <= 3600:
            raise ValueError(f"Limits.cpu_s={self.cpu_s!r} must lie in (0, 3600] or be None (= wall_s)")

    @property
    def cpu_seconds(self) -> int:
        """RLIMIT_CPU in whole seconds: ``cpu_s``, else a backstop 2 s past ``wall_s`` so that the wall
        limit, not SIGXCPU, ends a single-threaded spin (the host kills the tree at ``wall_s`` anyway)."""
        if self.cpu_s is not None:
            return max(1, int(-(-self.cpu_s // 1)))
        return int(-(-self.wall_s // 1)) + 2


@dataclass(frozen=True, slots=True)
class ExecRequest:
    """One program run. ``files`` (relative name -> bytes) are written into the fresh working directory
    before the run; ``argv[0]`` is an absolute path inside the read-only system binds (e.g.
    ``/usr/bin/python3``). Nothing here is ever passed through a shell."""

    argv: tuple[str, ...]
    files: Mapping[str, bytes] = field(default_factory=dict)
    stdin: bytes = b""
    limits: Limits = field(default_factory=Limits)
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.argv or not self.argv[0].startswith("/"):
            raise ValueError(f"ExecRequest.argv must start with an absolute program path, got {self.argv!r}")
        for name in self.files:
            if not name or name.startswith("/") or ".." in name.split("/") or "\0" in name:
                raise ValueError(f"ExecRequest.files: {name!r} must be a relative path without '..'")


@dataclass(frozen=True, slots=True)
class ExecResult:
    """What happened. ``status`` is ``ok`` when the program ran to an exit (any exit code or signal),
    ``timeout`` when the wall limit killed it, ``sandbox_error`` when the sandbox itself failed (the
    program's behaviour is then unknown and must never be scored as a failure). ``stdout``/``stderr`` are
    capped at ``Limits.output_bytes`` each (``*_truncated`` says when); ``signal`` is the terminating
    signal number of the main process, if any."""

    status: ExecStatus
    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    wall_s: float
    isolation: Isolation
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    oom_killed: bool = False
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend enforces on this machine (reported by ``/healthz`` and the probe)."""

    isolation: Isolation
    namespaces: tuple[str, ...]
    cgroup_pids: bool
    cgroup_memory: bool
    rlimits: tuple[str, ...]
    uid: int


class Sandbox(Protocol):
    """A way to run untrusted programs. Implementations are thread-safe: ``run`` may be called from
    several threads at once, each call in its own fresh directory and process tree."""

    @property
    def isolation(self) -> Isolation: ...

    @property
    def capabilities(self) -> Capabilities: ...

    def run(self, request: ExecRequest) -> ExecResult:
        """Run ``request`` to completion (or its wall limit); the whole process tree is dead on return."""
        ...

    def close(self) -> None:
        """Release what the backend holds beyond single runs; the sandbox is unusable afterwards."""
        ...
