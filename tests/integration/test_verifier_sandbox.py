"""The sandbox backends on this machine: the probe, what each backend enforces, clean-up, failure modes,
and the killable math pool.

Backend tests are parametrized over the backends the probe reports available (never skipped silently);
``test_an_isolating_backend_is_available`` fails when no isolating backend (zygote, nsjail, bwrap) works here.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from pathlib import Path

import pytest

from services.verifier.sandbox import (
    ISOLATING_BACKENDS,
    ExecRequest,
    Limits,
    SandboxUnavailableError,
    build_backend,
    probe_all,
    select_sandbox,
)
from services.verifier.sandbox import zygote as zygote_module
from services.verifier.sandbox.cgroups import CgroupManager, shared_manager
from services.verifier.sandbox.nsjail import NsjailSandbox
from services.verifier.sandbox.pool import KillablePool, TaskTimeout

PYTHON = "/usr/bin/python3"
PROBES = probe_all(python=PYTHON)
AVAILABLE = [name for name, result in PROBES.items() if result.available]
ISOLATING = [name for name in AVAILABLE if name in ISOLATING_BACKENDS]


def _py(code: str, **limits: object) -> ExecRequest:
    return ExecRequest((PYTHON, "main.py"), files={"main.py": code.encode()}, limits=Limits(**limits))  # type: ignore[arg-type]


def _nobody_processes(marker: str) -> list[int]:
    """Host pids whose command line holds ``marker`` (the test's own unique string)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return [pid for pid in found if pid != os.getpid()]


def test_an_isolating_backend_is_available() -> None:
    report = {name: result.detail for name, result in PROBES.items()}
    assert ISOLATING, f"no isolating backend works on this machine: {report}"
    for name in ISOLATING:
        checks = PROBES[name].checks
        assert all(checks.values()) and {"only_loopback", "host_file_hidden", "pid_namespace"} <= set(checks)


@pytest.fixture(params=AVAILABLE)
def sandbox(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    box = build_backend(request.param)
    yield box
    box.close()


def test_exit_codes_stdin_and_output(sandbox) -> None:  # type: ignore[no-untyped-def]
    code = "import sys\ndata = sys.stdin.read()\nprint(data.upper())\nsys.stderr.write('err')\nsys.exit(3)"
    request = ExecRequest((PYTHON, "main.py"), files={"main.py": code.encode()}, stdin=b"hello " * 20000)
    result = sandbox.run(request)
    assert (result.status, result.exit_code, result.isolation) == ("ok", 3, sandbox.isolation)
    assert result.stdout.startswith(b"HELLO HELLO") and result.stderr == b"err"


def test_output_is_capped_and_the_run_still_ends(sandbox) -> None:  # type: ignore[no-untyped-def]
    result = sandbox.run(_py("import sys\nsys.stdout.write('x' * (50 << 20))", output_bytes=4096, wall_s=20))
    assert result.status == "ok" and result.stdout_truncated and len(result.stdout) == 4096


def test_wall_limit_kills_the_whole_tree(sandbox) -> None:  # type: ignore[no-untyped-def]
    marker = f"31.{os.getpid()}{time.monotonic_ns() % 10**6}"
    code = (
        "import subprocess, time\n"
        f"subprocess.Popen(['/usr/bin/sleep', '{marker}'], start_new_session=True)\n"
        "time.sleep(60)\n"
    )
    start = time.monotonic()
    result = sandbox.run(_py(code, wall_s=1.0))
    assert result.status == "timeout" and time.monotonic() - start < 15
    assert _nobody_processes(marker) == []  # the detached grandchild died with the tree


def test_a_background_process_does_not_outlive_a_normal_exit(sandbox) -> None:  # type: ignore[no-untyped-def]
    marker = f"32.{os.getpid()}{time.monotonic_ns() % 10**6}"
    code = f"import subprocess\nsubprocess.Popen(['/usr/bin/sleep', '{marker}'], start_new_session=True)\n"
    assert sandbox.run(_py(code)).status == "ok"
    assert _nobody_processes(marker) == []


def test_fork_bomb_is_bounded_by_the_pids_limit(sandbox) -> None:  # type: ignore[no-untyped-def]
    code = (
        "import os\nn = 0\n"
        "for _ in range(10000):\n"
        "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n        import time; time.sleep(30); os._exit(0)\n"
        "    n += 1\nprint(n)\n"
    )
    result = sandbox.run(_py(code, pids=16, wall_s=10))
    assert result.status == "ok", result.detail
    assert 1 <= int(result.stdout) < 16  # the program plus its children stay within pids=16


def test_memory_limit(sandbox) -> None:  # type: ignore[no-untyped-def]
    code = "blocks = []\nfor _ in range(100):\n    blocks.append(bytearray(16 << 20))\nprint('survived')"
    result = sandbox.run(_py(code, memory_mb=128, wall_s=10))
    assert result.status == "ok" and b"survived" not in result.stdout
    assert result.exit_code not in (0, None) or result.signal is not None


def test_per_run_cgroups_and_temp_dirs_are_removed(sandbox) -> None:  # type: ignore[no-untyped-def]
    before = set(os.listdir(sandbox.tmp_base))
    sandbox.run(_py("open('f', 'w').write('x' * 1000)"))
    assert {n for n in set(os.listdir(sandbox.tmp_base)) - before if n.startswith("lpo-sbx-")} == set()
    for parent in {sandbox.cgroups.pids_parent, sandbox.cgroups.memory_parent} - {None}:
        assert [p for p in parent.iterdir() if p.is_dir()] == []


@pytest.mark.parametrize("name", ISOLATING)
def test_isolation(name: str, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    secret.chmod(0o644)
    tmp_path.chmod(0o755)
    code = (
        "import os, socket\n"
        f"try:\n    print(open({str(secret)!r}).read())\nexcept OSError as e:\n    print('hidden', e.errno)\n"
        "print(sorted(n for _, n in socket.if_nameindex()))\n"
        "print(os.getuid(), os.getpid())\n"
    )
    box = build_backend(name)
    try:
        result = box.run(_py(code))
    finally:
        box.close()
    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith("hidden"), lines
    assert lines[1] == "['lo']"
    uid, pid = map(int, lines[2].split())
    assert uid == 65534 and pid <= 3


KEYS = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
found = []
for keyring in (-3, -4, -5):  # session, user, user-session keyrings: whatever a run inherits or shares
    for name in (b"lpo-service-key", b"lpo-planted-key"):
        if libc.syscall(250, 10, ctypes.c_long(keyring), b"user", name, 0) > 0:  # KEYCTL_SEARCH
            found.append(name.decode())
print("found " + " ".join(sorted(set(found))) if found else "nothing")
if sys.argv[1:] == ["plant"]:
    for keyring in (-3, -4, -5):
        data = b"planted"
        key = libc.syscall(248, b"user", b"lpo-planted-key", data, len(data), ctypes.c_long(keyring))
        print("planted" if key > 0 else "not planted")
"""


@pytest.mark.parametrize("name", ISOLATING)
def test_no_execution_shares_a_keyring_with_the_service_or_another(name: str) -> None:
    """The service holds a key in its session keyring when the sandbox starts (the zygote: its process);
    run A looks for it and plants keys of its own in every keyring it can reach; run B looks for both.
    (The test process keeps the fresh session keyring it joins here: nothing else uses one.)"""
    assert os.uname().machine == "x86_64", "the syscall numbers below are x86_64's"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    assert libc.syscall(250, 1, None) > 0, ctypes.get_errno()  # KEYCTL_JOIN_SESSION_KEYRING: a fresh one
    secret = b"service-credential"
    key = libc.syscall(248, b"user", b"lpo-service-key", secret, len(secret), ctypes.c_long(-3))
    assert key > 0, ctypes.get_errno()
    assert libc.syscall(250, 10, ctypes.c_long(-3), b"user", b"lpo-service-key", 0) == key  # findable here
    box = build_backend(name)
    try:
        a = box.run(ExecRequest((PYTHON, "keys.py", "plant"), files={"keys.py": KEYS.encode()}))
        b = box.run(ExecRequest((PYTHON, "keys.py"), files={"keys.py": KEYS.encode()}))
    finally:
        box.close()
    assert a.stdout.decode().split("\n")[0] == "nothing", a
    assert "planted" in a.stdout.decode().split("\n"), a  # the plant itself worked, in A's own keyrings
    assert b.stdout == b"nothing\n", b


def test_a_broken_backend_reports_sandbox_error_not_a_program_failure() -> None:
    box = NsjailSandbox(binary="/bin/false")
    try:
        result = box.run(_py("print(1)"))
    finally:
        box.close()
    assert result.status == "sandbox_error" and "nsjail did not start the program" in result.detail


def test_select_refuses_clearly_or_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NSJAIL", "/nonexistent/nsjail")
    monkeypatch.setenv("PATH", "/nonexistent")  # no bwrap either
    monkeypatch.setattr(zygote_module, "JAIL_SCRIPT", Path("/nonexistent/jail.py"))  # a zygote that dies
    with pytest.raises(SandboxUnavailableError, match=r"'nsjail' is unavailable.*install bubblewrap"):
        select_sandbox("nsjail", fallback=True, python=PYTHON)


def test_a_broken_zygote_falls_back_to_nsjail_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "nsjail" in AVAILABLE, PROBES["nsjail"].detail
    monkeypatch.setattr(zygote_module, "JAIL_SCRIPT", Path("/nonexistent/jail.py"))
    with pytest.raises(
        SandboxUnavailableError, match=r"'zygote' is unavailable.*set verifier.sandbox=nsjail"
    ):
        select_sandbox("zygote", fallback=False, python=PYTHON)
    box, results = select_sandbox("zygote", fallback=True, python=PYTHON)
    try:
        assert box.isolation == "nsjail" and not results["zygote"].available
        assert "zygote" in results["zygote"].detail
    finally:
        box.close()


def test_fallback_goes_to_another_isolating_backend_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NSJAIL", "/bin/false")  # nsjail "exists" but cannot start anything
    monkeypatch.setattr(zygote_module, "JAIL_SCRIPT", Path("/nonexistent/jail.py"))
    if "bwrap" not in AVAILABLE:  # nothing to fall back to: both ways refuse
        with pytest.raises(SandboxUnavailableError, match="'nsjail' is unavailable"):
            select_sandbox("nsjail", fallback=True, python=PYTHON)
        return
    with pytest.raises(SandboxUnavailableError, match="set verifier.sandbox=bwrap"):
        select_sandbox("nsjail", fallback=False, python=PYTHON)
    box, results = select_sandbox("nsjail", fallback=True, python=PYTHON)
    try:
        assert box.isolation == "bwrap" and not results["nsjail"].available
    finally:
        box.close()


def test_killable_pool_kills_an_overrunning_task_and_keeps_serving() -> None:
    pool = KillablePool(1)
    try:
        assert pool.call(divmod, (7, 2), timeout_s=30) == (3, 1)
        start = time.monotonic()
        with pytest.raises(TaskTimeout):
            pool.call(time.sleep, (60,), timeout_s=0.5)
        assert time.monotonic() - start < 5
        assert pool.call(divmod, (9, 4), timeout_s=30) == (2, 1)  # the replacement worker answers
        with pytest.raises(RuntimeError, match="ZeroDivisionError"):
            pool.call(divmod, (1, 0), timeout_s=30)
    finally:
        pool.close()


def test_cgroups_are_available_and_stale_parents_are_reaped() -> None:
    manager = shared_manager()
    assert manager.pids and manager.memory, f"no pids/memory cgroup here: {manager.reason}"
    dead = subprocess.Popen(["/usr/bin/true"])
    dead.wait()
    stale = manager.pids_parent.parent / f"lpo-verifier-{dead.pid}-stale0"
    stale.mkdir()
    (stale / "run-leftover").mkdir()
    CgroupManager().close()  # a new manager reaps parents whose process is gone
    assert not stale.exists()
    assert manager.pids_parent.exists()  # the live process's own parent is kept
