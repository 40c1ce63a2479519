"""The zygote process of the ``zygote`` backend: a warm interpreter that forks a fresh jail per execution.

Standard library only: it runs as a script under the sandbox interpreter (``verifier.python``), started by
``ZygoteSandbox`` (``zygote.py``) with a clean ``execve``, an environment of ``PATH`` and ``LANG`` only,
``-I`` (no user site, no ``PYTHON*`` variables) and one ``SOCK_SEQPACKET`` socket as its only file besides
stdio. So it holds no secret of the service, and it never reads the content of an execution: each message
carries only file descriptors (the run's spec in a memfd the service wrote, the stdin read end, the
stdout/stderr/status write ends) and the run's backstop deadline.

At start-up the zygote joins a fresh session keyring (not the service's) and builds the read-only part of
every jail's root once, in a mount namespace of its own (``_make_template``). Per message it takes a
network namespace from its pool (``_NetPool``: loopback only, used by one execution at a time, reused
only when the last execution left no trace in it), unshares a new pid namespace for its next child,
forks, closes its copies (all but the status pipe) and goes back to waiting; it reaps each child, checks
its network namespace and writes the exit status on that run's status pipe. The child, used for this one
execution and gone after it, is pid 1 of the new namespace (as under nsjail), dies with the zygote
(``PR_SET_PDEATHSIG``), leads its own session, joins a fresh anonymous session keyring and resets the
signals CPython ignores. It reads the spec, enters its network namespace, joins the run's pids and memory
cgroups, unshares new mount, ipc and uts namespaces, mounts a fresh ``/proc``, a tmpfs ``/tmp`` and the
run's work dir at ``/work`` on its copy of that read-only root (a tmpfs with read-only, nosuid binds of
the system directories and ``/dev/{null,zero,random,urandom}``), ``pivot_root``s into it and detaches the
host's tree, sets the hostname, closes every descriptor but stdio, sets the rlimits, drops to a host
uid/gid of this execution's own (65534 inside), with no supplementary groups, in a user namespace of its
own (``RLIMIT_NPROC`` per execution) that may create no nested user namespace, with no capabilities and
``no_new_privs`` (setuid binaries stay unprivileged), takes the run's environment only, and runs the
program. When ``argv`` asks the zygote's own interpreter for a script, ``-c`` or ``-m``, it runs in this
already-warm process (a copy-on-write fork of the zygote: nothing flows back); any other ``argv`` is
``execve``d in the jail. When it exits the kernel kills everything left in its pid namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gc
import json
import marshal
import os
import re
import resource
import select
import signal
import socket
import struct
import sys
import time
import traceback

# Imported once here so that programs (and the code harness) find them warm in every fork. Kept small:
# every resident page of the zygote is copied (page tables at fork, data on first write) per execution.
PRELOAD = (
    "bisect",
    "collections",
    "copy",
    "functools",
    "heapq",
    "itertools",
    "math",
    "random",
    "runpy",
    "string",
)

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
SIOCSIFFLAGS, IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x8914, 0x1, 0x8, 0x40
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}
KEYCTL_JOIN_SESSION_KEYRING = 1
SYSTEM_DIRS = ("/usr", "/bin", "/lib", "/lib64", "/sbin")
DEVICES = {"null": (1, 3), "zero": (1, 5), "random": (1, 8), "urandom": (1, 9)}
N_FDS = 5  # spec, stdin, stdout, stderr, status
# What the kernel keeps of a network namespace's use after its last process is gone, each per namespace:
# interface counters (any packet on lo), the IP/ICMP/UDP/TCP counters (also errors with no packet, such
# as a send with no route), live, orphaned and TIME_WAIT sockets and reassembly queues, lingering IPv6
# flow labels. sockstat's allocation and memory figures are global, not the namespace's: masked.
NET_TRACES = ("dev", "snmp", "snmp6", "netstat", "sockstat", "sockstat6", "ip6_flowlabel")
_GLOBAL_FIGURES = re.compile(rb" (alloc|mem|memory) \d+")
NETNS_KEEP = 32  # free namespaces kept for reuse; more in flight at once are dropped when they end
_PYTHON_FLAGS = set("IEsSBuq")

CLONE_NEWUSER = 0x10000000
_CAP_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = tuple((name, ctypes.c_uint32) for name in ("effective", "permitted", "inheritable"))


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long
_zygote_pidfd = -1  # set by serve()
_template_root = ""  # set by main(): where _make_template built the jails' read-only root
_executable = os.path.realpath(sys.executable)  # what a program's argv[0] is compared with


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if s is None else s.encode() for s in (src, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], flags, enc[3]), f"mount {src} on {target}")


def _prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, arg, 0, 0, 0), f"prctl({option})")


def _new_session_keyring() -> None:
    """Join a fresh anonymous session keyring, so that no execution can read the keys of the service (or of
    whatever started it) nor plant keys for a later execution through an inherited one."""
    nr = SYS_KEYCTL.get(os.uname().machine)
    if nr is None:  # the jail cannot be built there either (pivot_root has no number): fail closed
        raise OSError(f"keyctl: unknown syscall number on {os.uname().machine}")
    if _libc.syscall(nr, KEYCTL_JOIN_SESSION_KEYRING, None) < 0:
        err = ctypes.get_errno()
        if err != errno.ENOSYS:  # a kernel without keys has no keyring to share
            raise OSError(err, f"keyctl(KEYCTL_JOIN_SESSION_KEYRING): {os.strerror(err)}")


def _report(fd: int, obj: dict) -> None:
    """One status line; the host may have stopped listening (it timed the run out), which is fine."""
    with contextlib.suppress(OSError):
        os.write(fd, (json.dumps(obj) + "\n").encode())


def _read_proc(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class _NetPool:
    """The jails' network namespaces: loopback only, each in one execution at a time, and reused only
    when the execution that ended in it left no trace there.

    A new network namespace is the dearest namespace to make and destroy (~1 ms of kernel time per
    execution here: its sysctl tables are registered, and it is torn down by a kernel worker). The
    program holds no capability in the namespace's owning user namespace (the initial one), so it cannot
    change its configuration (interfaces, addresses, routes, sysctls, netfilter); what it can leave there
    is in ``NET_TRACES``: sockets that outlive their process (TIME_WAIT, orphans), lingering flow labels,
    and counters that any packet (or failed send) moves. The zygote reads those in the namespace when
    the execution's last process is gone (the reap of its pid 1 comes after every other process of its
    pid namespace has exited) and keeps the namespace only if they read exactly as when the namespace was
    made; otherwise the namespace is dropped and a later execution gets a new one. So a namespace is
    reused only by executions that never used the network, and the next one finds it as new: no socket,
    no counter, no state. TCP metrics are never saved in it (``tcp_no_metrics_save``).
    """

    def __init__(self, keep: int = NETNS_KEEP) -> None:
        self.own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.keep = keep
        self.free: list[int] = []
        self.pristine: dict[int, bytes] = {}  # namespace fd -> its traces as made

    def take(self) -> tuple[int, bool]:
        """A namespace for one execution, and whether it was reused."""
        if self.free:
            return self.free.pop(), True
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        try:
            fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            flags = IFF_UP | IFF_LOOPBACK | IFF_RUNNING
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # lo up: its only interface
                fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", flags))
            _write_proc("/proc/sys/net/ipv4/tcp_no_metrics_save", "1")
            self.pristine[fd] = self._traces()
        finally:
            self._home()
        return fd, False

    def give_back(self, fd: int) -> bool:
        """Keep ``fd`` for reuse if its execution left no trace in it (True), else drop it."""
        kept = False
        if len(self.free) < self.keep and _libc.setns(fd, CLONE_NEWNET) == 0:
            try:
                kept = self._traces() == self.pristine[fd]
            except OSError:
                kept = False
            finally:
                self._home()
        if kept:
            self.free.append(fd)
        else:
            del self.pristine[fd]
            os.close(fd)
        return kept

    def _home(self) -> None:
        """Back to the zygote's own network namespace; should that fail, the zygote dies (and is replaced)
        rather than fork jails from a namespace that is not its own."""
        _check(_libc.setns(self.own, CLONE_NEWNET), "setns back to the zygote's network namespace")

    @staticmethod
    def _traces() -> bytes:
        """The current network namespace's ``NET_TRACES`` (``/proc/thread-self/net`` is the reader's)."""
        files = (_read_proc(f"/proc/thread-self/net/{name}") for name in NET_TRACES)
        return b"\0".join(_GLOBAL_FIGURES.sub(b"", text) for text in files)


def serve(sock: socket.socket) -> None:
    """The zygote loop: one fork per message, until the service closes its end of the socket.

    Before each fork the zygote unshares a new pid namespace *for its children* (it stays in its own),
    so the child is pid 1 of a fresh namespace without a second fork; ``setns`` back to its own pid
    namespace re-arms ``unshare`` for the next message. The zygote reaps its children and writes each
    one's exit status on that run's status pipe; a child past its backstop deadline is SIGKILLed.
    """
    global _zygote_pidfd
    _zygote_pidfd = os.pidfd_open(os.getpid())  # readable once the zygote has exited
    own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # the handler only wakes select via wake_w
    nets = _NetPool()
    running: dict[int, _Run] = {}  # child pid -> its status fd, backstop deadline, network namespace
    while True:
        _reap(running, nets)
        now = time.monotonic()
        for pid, run in list(running.items()):
            if run.deadline <= now:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)  # reaped (and reported) on the next round
        timeout = min((r.deadline for r in running.values()), default=now + 60.0) - now
        ready, _, _ = select.select([sock, wake_r], [], [], max(timeout, 0.0))
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 512):
                    pass
        if sock not in ready:
            continue
        msg, fds, _flags, _addr = socket.recv_fds(sock, 64, N_FDS)
        if not msg and not fds:
            return  # the service is gone: the zygote exits and PR_SET_PDEATHSIG kills its jails
        if len(fds) != N_FDS or not msg.startswith(b"run "):
            for fd in fds:
                os.close(fd)
            continue
        try:
            net, reused = nets.take()
        except OSError as exc:
            _report(fds[4], {"error": f"zygote could not make a network namespace: {exc}"})
            for fd in fds:
                os.close(fd)
            continue
        pid = _spawn(fds, net, own_pid_ns)
        for fd in fds[:4]:
            os.close(fd)
        if pid is None:
            os.close(fds[4])
            nets.give_back(net)
        else:
            running[pid] = _Run(fds[4], time.monotonic() + float(msg.split()[1]), net, reused)


class _Run:
    __slots__ = ("status", "deadline", "net", "reused")

    def __init__(self, status: int, deadline: float, net: int, reused: bool) -> None:
        self.status, self.deadline, self.net, self.reused = status, deadline, net, reused


def _spawn(fds: list[int], net: int, own_pid_ns: int) -> int | None:
    """Fork one jail as pid 1 of a new pid namespace; None (reported on the status pipe) on failure."""
    try:
        _check(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
        try:
            pid = os.fork()
        finally:
            if os.getpid() != 1:
                _check(_libc.setns(own_pid_ns, CLONE_NEWPID), "setns back to the zygote's pid namespace")
    except OSError as exc:
        _report(fds[4], {"error": f"zygote could not fork: {exc}"})
        return None
    if pid == 0:
        code = 71
        try:
            _program(*fds, net)
        except BaseException as exc:  # fd 3 is the status pipe until the program starts
            _report(3, {"error": f"jail set-up: {type(exc).__name__}: {exc}"})
        finally:
            os._exit(code)
    return pid


def _reap(running: dict[int, _Run], nets: _NetPool) -> None:
    while running:
        try:
            pid, wstatus = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        run = running.pop(pid, None)
        if run is None:
            continue
        # Every process of the run is gone now (its pid namespace died with its pid 1): what is left in its
        # network namespace is all it will ever leave there.
        net = {"netns": "reused" if run.reused else "new", "netns_kept": nets.give_back(run.net)}
        if os.WIFSIGNALED(wstatus):
            _report(run.status, {"signal": os.WTERMSIG(wstatus), **net})
        else:
            _report(run.status, {"exit": os.waitstatus_to_exitcode(wstatus), **net})
        os.close(run.status)


def _make_template(root: str) -> None:
    """The read-only part of every jail's filesystem, built once, at ``root`` (an empty host directory), in
    a mount namespace of the zygote's own: a tmpfs with read-only, nosuid binds of the system directories,
    ``/dev/{null,zero,random,urandom}``, and empty ``/proc``, ``/tmp`` and ``/work`` for each jail's own
    mounts. The host never sees it (and nothing is left to unmount should the zygote die); each jail's
    mount namespace starts as a copy of the zygote's, so it finds the template there, mounts its own
    ``/proc``, ``/tmp`` and ``/work`` on it and ``pivot_root``s into it (``_enter_root``)."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS) for the jails' template root")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    _mount("tmpfs", root, "tmpfs", MS_NOSUID, "size=1m,mode=0755")
    for path in SYSTEM_DIRS:
        target = root + path
        if os.path.islink(path):
            os.symlink(os.readlink(path), target)
        elif os.path.isdir(path):
            os.mkdir(target)
            _mount(path, target, None, MS_BIND)  # not MS_REC: no host submount comes along
            _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.mkdir(root + "/dev")
    for name, (major, minor) in DEVICES.items():
        os.mknod(f"{root}/dev/{name}", 0o666 | 0o020000, os.makedev(major, minor))
        os.chmod(f"{root}/dev/{name}", 0o666)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):  # fmt: skip
        os.symlink(target, f"{root}/dev/{name}")
    for name in ("proc", "tmp", "work"):
        os.mkdir(f"{root}/{name}")
    # read-only from here on, for every jail (a mount's flags are copied with the namespace; the jails,
    # without capabilities in the owning user namespace, cannot remount it)
    _mount(None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)


def _enter_root(root: str, work: str) -> None:
    """This jail's own ``/proc``, ``/tmp`` and ``/work`` on its copy of the template at ``root``, then
    ``pivot_root`` into it with the host's tree detached."""
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=1777")
    _mount(work, root + "/work", None, MS_BIND)
    _mount(None, root + "/work", None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
    os.chdir(root)
    nr = SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise OSError(f"pivot_root: unknown syscall number on {os.uname().machine}")
    _check(_libc.syscall(nr, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")  # the host's tree is gone from this view
    os.chdir("/")


def _program(spec_fd: int, stdin: int, stdout: int, stderr: int, status: int, net: int) -> None:
    """Pid 1 of the new pid namespace: build the jail, drop to the run's own uid, run the program."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # first: should the zygote die, its jails die
    # getppid() is 0 here (the zygote is outside this pid namespace); its pidfd says whether it died
    # before the line above
    if select.select([_zygote_pidfd], [], [], 0)[0]:
        os._exit(71)
    spec = marshal.loads(os.pread(spec_fd, os.fstat(spec_fd).st_size, 0))
    _check(_libc.setns(net, CLONE_NEWNET), "setns into the run's network namespace")  # closed below
    for target, fd in enumerate((stdin, stdout, stderr, status)):  # every fd here is >= 3: no clobbering
        os.dup2(fd, target)
    os.set_inheritable(3, False)  # closed on execve; closed before running Python code below
    os.closerange(4, resource.getrlimit(resource.RLIMIT_NOFILE)[0])  # incl. other runs' status pipes
    signal.set_wakeup_fd(-1)  # the zygote's loop plumbing: the program gets the defaults a fresh
    for sig in (signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ):  # process has (CPython ignores SIGPIPE
        signal.signal(sig, signal.SIG_DFL)  # and SIGXFSZ; _run_python re-ignores them as CPython does)
    os.setsid()  # a session (and so a scheduler autogroup) of its own, as nsjail/bwrap runs get
    _new_session_keyring()
    for procs in spec["cgroup_procs"]:  # first: everything below runs inside the run's limits
        fd = os.open(procs, os.O_WRONLY)
        try:
            os.write(fd, b"0")  # "0" is the writer (its pid in this namespace means nothing to cgroupfs)
        finally:
            os.close(fd)
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    _enter_root(_template_root, spec["work"])
    host = spec["hostname"].encode()
    _check(_libc.sethostname(host, len(host)), "sethostname")
    os.chdir("/work")
    for res, value in spec["rlimits"]:
        resource.setrlimit(res, (value, value))
    _drop_privileges(spec["host_uid"], spec["uid"], spec["nproc"])
    os.environ.clear()
    os.environ.update(spec["env"])
    argv = spec["argv"]
    if os.path.realpath(argv[0]) == _executable:
        plan = _python_plan(argv[1:])
        if plan is not None:
            os.close(3)  # from here on, nothing of the jail's plumbing is open in the program
            _run_python(*plan)
    os.execve(argv[0], argv, spec["env"])


def _drop_privileges(host_id: int, inner_id: int, nproc: int) -> None:
    """Host uid/gid ``host_id`` (this execution's own), seen as ``inner_id`` (65534) inside a user namespace
    of this execution's own that may create no further user namespace; no capabilities, ``no_new_privs``.

    An id of its own means no other process on the host (another execution, a daemon running as nobody)
    has the uid that may signal, trace or read it. The user namespace makes ``RLIMIT_NPROC`` count this
    execution's processes only: a fork bomb then fails at the start of ``fork``, before the kernel copies
    its address space, and cannot slow its neighbours (the pids cgroup alone fails it late).
    """
    highest = resource.getrlimit(resource.RLIMIT_NPROC)[1]  # the host-level cap recorded at unshare:
    resource.setrlimit(resource.RLIMIT_NPROC, (highest, highest))  # as high as the service's own
    os.setgroups([])
    os.setresgid(host_id, host_id, host_id)
    os.setresuid(host_id, host_id, host_id)
    _check(_libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
    _prctl(PR_SET_DUMPABLE, 1)  # the uid change made /proc/self root's; dumpable, as under nsjail
    maps = (
        ("setgroups", "deny"),
        ("uid_map", f"{inner_id} {host_id} 1"),
        ("gid_map", f"{inner_id} {host_id} 1"),
    )
    for name, text in maps:
        _write_proc(f"/proc/self/{name}", text)  # unprivileged: each maps only our own host id
    # While it still holds the new namespace's capabilities: no nested user namespace, which would hand
    # the program a full capability set again (the limit is per namespace and binds its descendants too).
    _write_proc("/proc/sys/user/max_user_namespaces", "0")
    header, data = _CapHeader(_CAP_VERSION_3, 0), (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")  # the new namespace's full set: dropped
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # credential changes cleared it
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def _write_proc(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _python_plan(args: list[str]) -> tuple[str, str, list[str], bool, bool] | None:
    """``(kind, target, argv, isolated, unbuffered)`` for ``python [-IEsSBuq]... (-c code | -m mod |
    script) args``; None for anything else (then the interpreter is exec'd for real)."""
    isolated = unbuffered = False
    while args and args[0].startswith("-") and args[0] not in ("-", "-c", "-m"):
        letters = set(args[0][1:])
        if not letters or not letters <= _PYTHON_FLAGS:
            return None
        isolated |= "I" in letters
        unbuffered |= "u" in letters
        args = args[1:]
    if not args or args[0] == "-":
        return None
    if args[0] in ("-c", "-m"):
        if len(args) < 2:
            return None
        return args[0][1], args[1], [args[0], *args[2:]], isolated, unbuffered
    return "s", args[0], list(args), isolated, unbuffered


def _stdio(unbuffered: bool) -> None:
    """Fresh ``sys.std*`` on fds 0-2, configured as CPython configures them for pipes."""
    import io

    buffering = 0 if unbuffered else -1
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(open(0, "rb", closefd=False), encoding="utf-8")  # noqa: SIM115
    out = open(1, "wb", buffering=buffering, closefd=False)  # noqa: SIM115  # lives as long as the process
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(out, encoding="utf-8", write_through=unbuffered)
    err = open(2, "wb", buffering=buffering, closefd=False)  # noqa: SIM115
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(
        err, encoding="utf-8", errors="backslashreplace", line_buffering=True, write_through=unbuffered
    )


def _run_python(kind: str, target: str, argv: list[str], isolated: bool, unbuffered: bool) -> None:
    """Run the program as ``python`` would, in this process, then exit with its status."""
    import atexit
    import runpy
    import types

    _stdio(unbuffered)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # as CPython's start-up sets them (execve resets them)
        signal.signal(sig, signal.SIG_IGN)
    sys.argv = argv
    code = 0
    try:
        if kind == "m":
            sys.argv[0] = target
            if not isolated:
                sys.path.insert(0, os.getcwd())
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            if kind == "c":
                source, filename = target, "<string>"
            else:
                with open(target, "rb") as f:
                    source, filename = f.read(), target
            if not isolated:
                sys.path.insert(0, "" if kind == "c" else os.path.dirname(os.path.abspath(target)))
            main = types.ModuleType("__main__")
            main.__dict__["__builtins__"] = __builtins__
            if kind == "s":
                main.__file__ = os.path.abspath(filename)  # as CPython >= 3.9 sets it
            sys.modules["__main__"] = main
            exec(compile(source, filename, "exec"), main.__dict__)
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException as exc:
        code = 1
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next if exc.__traceback__ else None)
    code = _shutdown(code, atexit)
    os._exit(code)


def _exit_code(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    with contextlib.suppress(BaseException):  # an unprintable exit value still exits with 1, as in CPython
        sys.stderr.write(f"{value}\n")
    return 1


def _shutdown(code: int, atexit: object) -> int:
    """What interpreter exit does: join non-daemon threads, run atexit handlers, flush stdio."""
    try:
        threading = sys.modules.get("threading")
        if threading is not None:
            threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()  # type: ignore[attr-defined]
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException:
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # a closed or broken stream: CPython exits with 120 after a failed flush
            code = code or 120
    return code


def main() -> None:
    """Entry point: ``python -I jail.py <fd> <template dir>`` with the control socket at ``fd``."""
    global _template_root
    for name in PRELOAD:
        __import__(name)
    _template_root = sys.argv[2]
    _make_template(_template_root)
    gc.freeze()  # a collection in a child would otherwise touch (and so copy) every object of the zygote
    _new_session_keyring()  # not the service's: each jail then joins a fresh one of its own
    sock = socket.socket(fileno=int(sys.argv[1]))
    serve(sock)


if __name__ == "__main__":
    main()
