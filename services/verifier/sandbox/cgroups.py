"""Per-execution cgroups: a pids limit, a memory limit and a reliable kill of the whole process tree.

The manager creates one parent per service process *below the cgroup this process already lives in*
(``<own>/lpo-verifier-<pid>-<tag>``), so sandboxed programs stay inside whatever accounting the host
applies to the service, and one child per execution below that parent. One manager is shared by every
sandbox of a process (``shared_manager``) and removes its parent at exit; parents left by processes that
died without cleaning up are removed when the next manager starts. The launched process joins the child
from ``preexec_fn`` (between fork and exec, before it can fork), so nothing escapes the limits.

Both layouts are handled: cgroup v1 (separate ``pids`` and ``memory`` hierarchies, as on this project's
machines) and cgroup v2 (one unified hierarchy, usable only when the controllers are delegated to this
process's cgroup). When neither works the manager reports it and the backends fall back to rlimits.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_KILL_ROUNDS = 200  # kill-and-rescan rounds; a pids-limited tree empties in a handful


def _mounts() -> dict[str, Path]:
    """Controller name (``pids``, ``memory``, ``unified``) -> mount point, from /proc/self/mountinfo."""
    found: dict[str, Path] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype, _src, opts = (right.split() + ["", "", ""])[:3]
            if fstype == "cgroup2":
                found.setdefault("unified", Path(fields[4]))
            elif fstype == "cgroup":
                for controller in ("pids", "memory"):
                    if controller in opts.split(","):
                        found.setdefault(controller, Path(fields[4]))
    return found


def _own_paths() -> dict[str, str]:
    """Controller (``pids``, ``memory``, ``unified``) -> this process's cgroup path (/proc/self/cgroup)."""
    own: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _id, controllers, path = line.split(":", 2)
            if controllers == "":
                own["unified"] = path
            for name in controllers.split(","):
                if name in ("pids", "memory"):
                    own[name] = path
    return own


def _write(path: Path | str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)  # os-level: this runs several times per execution
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 1 << 16).decode()
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale_parents(folder: Path) -> int:
    """Remove ``lpo-verifier-<pid>-*`` parents in ``folder`` whose process is gone (and their children,
    after killing what is left in them); returns how many were removed."""
    removed = 0
    with contextlib.suppress(OSError):
        for parent in folder.glob("lpo-verifier-*"):
            pid = parent.name.split("-")[2]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            for child in [c for c in parent.iterdir() if c.is_dir()]:
                RunCgroup((child,), None, None, v2=False).remove()
            with contextlib.suppress(OSError):
                parent.rmdir()
                removed += 1
    return removed


@dataclass(frozen=True, slots=True)
class RunCgroup:
    """The cgroup(s) of one execution: one directory per v1 hierarchy, or one v2 directory."""

    dirs: tuple[Path, ...]
    pids_dir: Path | None
    memory_dir: Path | None
    v2: bool

    def procs_files(self) -> tuple[str, ...]:
        """The ``cgroup.procs`` files the launched process writes its pid into (from ``preexec_fn``)."""
        return tuple(str(d / "cgroup.procs") for d in self.dirs)

    def pids(self) -> list[int]:
        found: set[int] = set()
        for procs in self.procs_files():
            with contextlib.suppress(OSError, ValueError):
                found.update(int(p) for p in _read(procs).split())
        return sorted(found)

    def kill_all(self) -> int:
        """SIGKILL every process in the cgroup until it is empty; returns how many rounds it took."""
        if self.v2 and (self.dirs[0] / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                _write(self.dirs[0] / "cgroup.kill", "1")
        for rounds in range(_KILL_ROUNDS):
            pids = self.pids()
            if not pids:
                return rounds
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.002 if rounds < 10 else 0.02)
        log.error(
            "cgroup %s still has processes %s after %d kill rounds", self.dirs, self.pids(), _KILL_ROUNDS
        )
        return _KILL_ROUNDS

    def oom_killed(self) -> bool:
        """Whether the memory limit killed a process in this cgroup."""
        if self.memory_dir is None:
            return False
        name = "memory.events" if self.v2 else "memory.oom_control"
        with contextlib.suppress(OSError):
            for line in _read(f"{self.memory_dir}/{name}").splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value or 0) > 0:
                    return True
        if not self.v2:
            with contextlib.suppress(OSError, ValueError):
                return int(_read(f"{self.memory_dir}/memory.failcnt")) > 0
        return False

    def remove(self) -> None:
        """Kill what is left and remove the directories (rmdir of an empty cgroup)."""
        self.kill_all()
        for d in self.dirs:
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)  # the last exits are still being reaped
            else:
                log.warning("could not remove cgroup %s", d)


class CgroupManager:
    """Creates per-execution cgroups under a per-service parent; ``available`` says whether it can."""

    def __init__(self) -> None:
        self.pids_parent: Path | None = None
        self.memory_parent: Path | None = None
        self.v2 = False
        self.reason = ""
        self._setup()

    @property
    def pids(self) -> bool:
        return self.pids_parent is not None

    @property
    def memory(self) -> bool:
        return self.memory_parent is not None

    def _setup(self) -> None:
        mounts, own = _mounts(), _own_paths()
        name = f"lpo-verifier-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        reasons = []
        for controller in ("pids", "memory"):
            if controller not in mounts or controller not in own:
                continue
            parent = mounts[controller] / own[controller].lstrip("/") / name
            reap_stale_parents(parent.parent)
            try:
                parent.mkdir()
                if controller == "memory":
                    with contextlib.suppress(OSError):
                        _write(parent / "memory.use_hierarchy", "1")
            except OSError as exc:
                reasons.append(f"cgroup v1 {controller}: cannot create {parent} ({exc.strerror})")
                continue
            setattr(self, f"{controller}_parent", parent)
        if self.pids or self.memory or "unified" not in mounts or "unified" not in own:
            self.reason = "; ".join(reasons) or ("" if self.pids else "no pids cgroup controller mounted")
            return
        self._setup_v2(mounts["unified"] / own["unified"].lstrip("/") / name, reasons)

    def _setup_v2(self, parent: Path, reasons: list[str]) -> None:
        reap_stale_parents(parent.parent)
        try:
            available = set((parent.parent / "cgroup.subtree_control").read_text().split())
        except OSError as exc:
            self.reason = "; ".join([*reasons, f"cgroup v2: {exc}"])
            return
        wanted = [c for c in ("pids", "memory") if c in available]
        if not wanted:
            self.reason = "; ".join(
                [*reasons, f"cgroup v2: controllers pids/memory are not delegated to {parent.parent}"]
            )
            return
        try:
            parent.mkdir()
            _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))
        except OSError as exc:
            self.reason = "; ".join([*reasons, f"cgroup v2: cannot set up {parent} ({exc.strerror})"])
            with contextlib.suppress(OSError):
                parent.rmdir()
            return
        self.v2 = True
        self.pids_parent = parent if "pids" in wanted else None
        self.memory_parent = parent if "memory" in wanted else None
        if self.memory_parent is None and self.pids_parent is None:
            parent.rmdir()

    def create(self, pids_max: int, memory_bytes: int) -> RunCgroup | None:
        """A fresh cgroup for one execution with ``pids.max`` and the memory limit set, or None when
        cgroups are unavailable (the caller then relies on rlimits)."""
        if not (self.pids or self.memory):
            return None
        name = f"run-{uuid.uuid4().hex[:12]}"
        if self.v2:
            assert self.pids_parent or self.memory_parent
            d = (self.pids_parent or self.memory_parent) / name  # type: ignore[operator]
            d.mkdir()
            if self.pids:
                _write(d / "pids.max", str(pids_max))
            if self.memory:
                _write(d / "memory.max", str(memory_bytes))
                with contextlib.suppress(OSError):
                    _write(d / "memory.swap.max", "0")
            return RunCgroup((d,), d if self.pids else None, d if self.memory else None, v2=True)
        dirs: list[Path] = []
        pids_dir = memory_dir = None
        if self.pids_parent is not None:
            pids_dir = self.pids_parent / name
            pids_dir.mkdir()
            _write(pids_dir / "pids.max", str(pids_max))
            dirs.append(pids_dir)
        if self.memory_parent is not None:
            memory_dir = self.memory_parent / name
            memory_dir.mkdir()
            _write(memory_dir / "memory.limit_in_bytes", str(memory_bytes))
            with contextlib.suppress(OSError):
                _write(memory_dir / "memory.memsw.limit_in_bytes", str(memory_bytes))
            dirs.append(memory_dir)
        return RunCgroup(tuple(dirs), pids_dir, memory_dir, v2=False)

    def close(self) -> None:
        """Remove the per-service parents (their children are removed after each run)."""
        for parent in {p for p in (self.pids_parent, self.memory_parent) if p is not None}:
            for child in parent.iterdir():
                if child.is_dir():
                    RunCgroup((child,), None, None, self.v2).remove()
            with contextlib.suppress(OSError):
                parent.rmdir()
        self.pids_parent = self.memory_parent = None


_SHARED: CgroupManager | None = None
_SHARED_LOCK = threading.Lock()


def shared_manager() -> CgroupManager:
    """The process-wide manager (created on first use, its parent removed at interpreter exit)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = CgroupManager()
            atexit.register(_SHARED.close)
        return _SHARED
