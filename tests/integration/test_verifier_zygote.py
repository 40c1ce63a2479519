"""The ``zygote`` backend (the fast path) against the real kernel: what each execution gets, what the
warm interpreter holds, fidelity with a real ``python`` under nsjail, and recovery from a dead zygote.

The generic backend tests (limits, clean-up, isolation) and the attack suite run against the zygote too,
through their parametrization over the probed backends; this file covers what is specific to it. It
fails (never skips) when the zygote does not pass its probe here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from services.verifier.sandbox import ExecRequest, Limits, build_backend, describe, probe_backend
from services.verifier.sandbox.zygote import ZygoteSandbox

PYTHON = "/usr/bin/python3"
NAMESPACES = ("pid", "mnt", "net", "ipc", "uts")


@pytest.fixture(scope="module")
def zygote() -> ZygoteSandbox:  # type: ignore[misc]
    box, probe = probe_backend("zygote", python=PYTHON)
    assert box is not None, f"the zygote backend does not pass its probe here: {probe.detail}"
    assert isinstance(box, ZygoteSandbox)
    yield box
    box.close()


def _py(code: str, *args: str, stdin: bytes = b"", **limits: object) -> ExecRequest:
    return ExecRequest(
        (PYTHON, "main.py", *args),
        files={"main.py": code.encode()},
        stdin=stdin,
        limits=Limits(**limits),  # type: ignore[arg-type]
    )


def test_each_execution_gets_fresh_namespaces_and_no_privilege(zygote: ZygoteSandbox) -> None:
    code = (
        "import json, os\n"
        f"ns = {{n: os.readlink('/proc/self/ns/' + n) for n in {NAMESPACES!r}}}\n"
        "status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())\n"
        "print(json.dumps({'ns': ns, 'pid': os.getpid(), 'uid': os.getuid(), 'groups': os.getgroups(),\n"
        "    'caps': status['CapEff'].strip(), 'nnp': status['NoNewPrivs'].strip(),\n"
        "    'procs': sorted(p for p in os.listdir('/proc') if p.isdigit())}), flush=True)\n"
        "import time; time.sleep(2)\n"  # alive together: a namespace's inode is unique while it lives
    )
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: zygote.run(_py(code, wall_s=20)), range(8)))
    seen = [json.loads(r.stdout) for r in results]
    host = {n: os.readlink(f"/proc/self/ns/{n}") for n in NAMESPACES}
    for name in NAMESPACES:
        inodes = {s["ns"][name] for s in seen}
        assert len(inodes) == len(seen) and host[name] not in inodes, (name, inodes)  # never shared
    for s in seen:
        assert (s["pid"], s["uid"], s["groups"], s["caps"], s["nnp"]) == (
            1,
            65534,
            [],
            "0000000000000000",
            "1",
        )
        assert s["procs"] == ["1"]  # nothing of any other execution is visible, not even the zygote


def test_concurrent_executions_see_only_their_own_files(zygote: ZygoteSandbox) -> None:
    code = (
        "import os, sys, time\n"
        "me = sys.argv[1]\n"
        "open(me, 'w').write(me); open('/tmp/' + me, 'w').write(me)\n"
        "time.sleep(0.3)\n"  # overlap with the others
        "print(sorted(os.listdir('.')), sorted(os.listdir('/tmp')))\n"
    )
    names = [f"run{i}-{uuid.uuid4().hex[:6]}" for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda n: zygote.run(_py(code, n)), names))
    for name, result in zip(names, results, strict=True):
        assert result.stdout.decode().strip() == f"{sorted(['main.py', name])} {[name]}", result


PROGRAMS = {
    "argv_name_path": "import sys\nprint(sys.argv, __name__, __file__, sys.path[0])",
    "stdin_echo": "import sys\ndata = sys.stdin.read()\nprint(len(data), data.upper()[:20])",
    "exit_code": "import sys\nprint('before')\nsys.exit(3)",
    "exit_message": "import sys\nsys.exit('bad input')",
    "raise": "def f():\n    raise ValueError('boom')\nf()",
    "os_exit": "import os\nprint('lost')\nos._exit(5)",
    "atexit_and_threads": (
        "import atexit, threading, time\natexit.register(lambda: print('atexit ran'))\n"
        "t = threading.Thread(target=lambda: (time.sleep(0.1), print('thread done')))\n"
        "t.start()\nprint('main done')"
    ),
    "killed_by_signal": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "env": "import os\nprint(sorted(os.environ))",
    "syntax_error": "print('unclosed'",
}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_python_programs_behave_as_under_a_fresh_interpreter(zygote: ZygoteSandbox, name: str) -> None:
    """The warm in-process run and a real ``python3`` exec'd in the same kind of jail (nsjail) agree."""
    request = _py(PROGRAMS[name], "arg1", stdin=b"some input\n" * 3)
    nsjail = build_backend("nsjail")
    try:
        want = nsjail.run(request)
    finally:
        nsjail.close()
    got = zygote.run(request)
    assert got.status == want.status == "ok", (got, want)
    if name == "killed_by_signal":
        # pid 1 of a pid namespace ignores its own SIGKILL under nsjail too; both then exit normally
        assert (got.exit_code, got.signal) == (want.exit_code, want.signal)
        return
    assert (got.exit_code, got.signal, got.stdout) == (want.exit_code, want.signal, want.stdout)
    assert got.stderr.splitlines()[-1:] == want.stderr.splitlines()[-1:]  # the error line, not the frames


@pytest.mark.parametrize(
    "argv",
    [
        (PYTHON, "-c", "import sys; print(sys.argv, __name__, sys.path[0])", "x"),
        (PYTHON, "-I", "main.py", "y"),
        (PYTHON, "-u", "main.py"),
        (PYTHON, "-m", "main", "z"),
    ],
    ids=["dash_c", "isolated", "unbuffered", "dash_m"],
)
def test_interpreter_options_behave_as_under_a_fresh_interpreter(zygote: ZygoteSandbox, argv: tuple) -> None:
    code = "import sys\nprint(sys.argv[1:], __name__, sys.path[0] if sys.path else None)\n"
    request = ExecRequest(argv, files={"main.py": code.encode()})
    nsjail = build_backend("nsjail")
    try:
        want = nsjail.run(request)
    finally:
        nsjail.close()
    got = zygote.run(request)
    assert (got.status, got.exit_code, got.stdout) == (want.status, want.exit_code, want.stdout), (got, want)


def test_other_programs_are_execed_inside_the_same_jail(zygote: ZygoteSandbox) -> None:
    result = zygote.run(ExecRequest(("/usr/bin/sh", "-c", "id -u; hostname; ls /; echo $$; exit 7")))
    lines = result.stdout.decode().split("\n")
    assert (result.status, result.exit_code) == ("ok", 7)
    assert lines[0] == "65534" and lines[1] == "sandbox" and lines[-2] == "1"
    assert "home" not in lines and "etc" not in lines and "work" in lines


def test_the_zygote_holds_no_secret_of_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """Started while the service's environment holds an API key and a credential URL: neither is in
    the zygote's environment, command line or memory (every readable mapping is scanned)."""
    secret = f"zygote-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("LPO_VERIFIER_API_KEYS", secret)
    monkeypatch.setenv("REDIS_URL", f"redis://user:{secret}@localhost:6379/0")
    box = ZygoteSandbox(python=PYTHON)
    try:
        assert box.run(_py("print(1)")).stdout == b"1\n"  # the zygote is up and has forked
        pid = box.zygote.pid
        assert pid is not None
        assert secret.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
        assert secret.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert not _memory_contains(pid, secret.encode())
        assert _memory_contains(os.getpid(), secret.encode())  # the scan does find it where it is
    finally:
        box.close()


def _memory_contains(pid: int, needle: bytes) -> bool:
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r") or "[vvar" in line or "[vsyscall" in line:
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except (OSError, ValueError, OverflowError):
                continue
    return False


def test_a_dead_zygote_is_replaced_and_the_service_keeps_running() -> None:
    box = ZygoteSandbox(python=PYTHON)
    try:
        first = box.zygote.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        box.zygote._proc.wait(timeout=10)  # type: ignore[union-attr]  # dead and reaped
        result = box.run(_py("print('after')"))
        assert (result.status, result.stdout) == ("ok", b"after\n"), result
        state = describe(box)
        assert state["backend"] == "zygote" and state["fast_path"] is True
        assert state["zygote_starts"] == 2 and state["zygote_pid"] not in (None, first)
    finally:
        box.close()


NET_STATE = (
    "import json, os\n"
    "lo = next(l for l in open('/proc/net/dev') if l.strip().startswith('lo:')).split(':')[1].split()\n"
    "snmp = [l.split() for l in open('/proc/net/snmp') if l.startswith('Ip:')]\n"
    "ip = dict(zip(snmp[0][1:], snmp[1][1:]))\n"
    "tw = open('/proc/net/sockstat').read().split('tw ')[1].split()[0]\n"
    "print(json.dumps({'ns': os.readlink('/proc/self/ns/net'), 'lo': [int(lo[1]), int(lo[9])],\n"
    "    'no_routes': int(ip['OutNoRoutes']), 'tw': int(tw)}))\n"
)
USE_LOOPBACK = (
    "import socket\n"
    "l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen()\n"
    "c = socket.create_connection(l.getsockname()); a, _ = l.accept(); c.close(); a.close()\n"
)
SEND_WITHOUT_ROUTE = (  # no packet at all, only a counter: the namespace has no route but loopback's
    "import socket\n"
    "try:\n    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('192.0.2.1', 9))\n"
    "except OSError:\n    pass\n"
)


@pytest.mark.parametrize("trace", [USE_LOOPBACK, SEND_WITHOUT_ROUTE], ids=["loopback", "no_route"])
def test_a_network_namespace_is_reused_only_when_its_run_left_no_trace(
    zygote: ZygoteSandbox, trace: str
) -> None:
    """Runs that never touch the network hand their namespace on (the next run finds it as new); a run that
    sent a packet or moved a counter has its namespace dropped, and the next run finds no trace of it."""

    def state() -> dict:
        result = zygote.run(_py(NET_STATE))
        assert result.status == "ok", result
        return json.loads(result.stdout)

    def netns() -> dict:
        return dict(describe(zygote)["netns"])

    first = state()
    before = netns()
    second = state()  # sequential runs that used no network: the same namespace, still pristine
    after_clean = netns()
    assert second["ns"] == first["ns"] and after_clean["reused"] == before["reused"] + 1, (first, second)
    assert after_clean["dropped"] == before["dropped"]
    assert zygote.run(_py(trace)).status == "ok"
    after_trace = netns()
    assert after_trace["dropped"] == after_clean["dropped"] + 1, after_trace
    third = state()
    assert (third["lo"], third["no_routes"], third["tw"]) == ([0, 0], 0, 0), third
    for seen in (first, second):
        assert (seen["lo"], seen["no_routes"], seen["tw"]) == ([0, 0], 0, 0), seen


def test_an_execution_cannot_create_a_user_namespace(zygote: ZygoteSandbox) -> None:
    """A nested user namespace would give the program a full capability set in it."""
    code = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print('created' if libc.unshare(0x10000000) == 0 else 'refused')\n"  # CLONE_NEWUSER
        "import subprocess\n"  # and util-linux's unshare(1), an exec'd program
        "done = subprocess.run(['unshare', '--user', 'true'], stderr=subprocess.DEVNULL).returncode == 0\n"
        "print('created' if done else 'refused')\n"
    )
    result = zygote.run(_py(code))
    assert result.stdout == b"refused\nrefused\n", result


def test_each_execution_has_a_host_uid_of_its_own(zygote: ZygoteSandbox) -> None:
    """65534 inside; outside a uid no other execution (nor a daemon running as nobody) has."""
    code = (
        "import os, time\n"
        "print(os.getuid(), open('/proc/self/uid_map').read().split()[1], flush=True)\n"
        "time.sleep(1)\n"
    )
    with ThreadPoolExecutor(4) as pool:  # alive together
        results = list(pool.map(lambda _: zygote.run(_py(code, wall_s=10)), range(4)))
    seen = [r.stdout.decode().split() for r in results]
    assert all(inner == "65534" for inner, _ in seen), seen
    outer = {int(host) for _, host in seen}
    assert len(outer) == 4 and not outer & {0, 65534}, seen


def test_each_execution_runs_in_its_own_cgroup(zygote: ZygoteSandbox) -> None:
    manager = zygote.cgroups
    parents = {p for p in (manager.pids_parent, manager.memory_parent) if p is not None}
    result = zygote.run(_py("print(open('/proc/self/cgroup').read())"))
    lines = result.stdout.decode().split("\n")
    for parent in parents:
        assert any(re.search(rf"/{parent.name}/run-[0-9a-f]{{12}}$", line) for line in lines), (parent, lines)


def test_processes_each_under_the_address_space_limit_together_hit_the_memory_cgroup(
    zygote: ZygoteSandbox,
) -> None:
    code = (
        "import os, time\n"
        "kids = []\n"
        "for _ in range(4):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        b = bytearray(100 << 20)\n"  # under RLIMIT_AS; four of them exceed the cgroup's limit
        "        for j in range(0, len(b), 4096): b[j] = 1\n"
        "        time.sleep(2); os._exit(0)\n"  # all alive together
        "    kids.append(pid)\n"
        "print(sorted(os.waitstatus_to_exitcode(os.waitpid(k, 0)[1]) for k in kids))\n"
    )
    result = zygote.run(_py(code, memory_mb=128, wall_s=15))
    assert result.oom_killed, result
    assert json.loads(result.stdout)[0] == -signal.SIGKILL, result


def test_exec_programs_get_default_sigpipe(zygote: ZygoteSandbox) -> None:
    """CPython ignores SIGPIPE and SIGXFSZ; a program it execs must not inherit that."""
    result = zygote.run(ExecRequest(("/usr/bin/sh", "-c", "grep SigIgn /proc/self/status")))
    ignored = int(result.stdout.split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1)), result
