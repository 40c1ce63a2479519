"""Code scorer (Python): run a program against its tests in one sandbox invocation; reward = fraction of
tests passed (paper Eq. 61), or 1/0 with ``short_circuit``.

Reference (the task's fields): ``language: "python"``, ``tests``: a list of ``{"stdin", "expected_stdout"}``
or ``{"assert": "<python statement>"}``, optional ``limits: {"wall_s", "memory_mb"}`` and ``short_circuit``.
The program is the last fenced ````` ```python ````` block of the response (else the last fence, else the
whole response).

Inside the sandbox a harness (``HARNESS`` below, run by the system Python) receives the tests on stdin,
makes itself non-dumpable (so the program, same uid, cannot read its memory or its stdout through
/proc), compiles the program once (a syntax error is a ``parse_error``) and runs each test in a fresh
``fork`` of itself (no interpreter start per test; the harness has run none of the program's code, so
each test starts from the same clean state): stdin/stdout tests run the program as ``__main__`` with the
test's stdin and report a digest of stdout normalised line by line (trailing whitespace ignored), which
the host compares with the expected output's digest, so expected outputs never enter the sandbox; assert
tests execute the program as module ``solution`` and then the statement, and pass only when the
statement completed (an early ``exit(0)`` is a failure); the statement is compiled, and everything the
test process runs after the program is bound, before the program runs, so replacing ``builtins.exec``,
``compile``, ``os.write`` or ``os._exit`` does not skip it (frame introspection still can: docs/VERIFIER.md).
After each test its process group is killed,
and where the harness is pid 1 of the jail (zygote, nsjail) every other process too. Results come back
as lines tagged with a per-run nonce on a descriptor no test holds. ``limits.wall_s`` bounds the whole
invocation. Status, in order: ``sandbox_error`` (the sandbox failed; never a ``fail``), ``parse_error``
(no program, or it does not compile), ``timeout`` (a test or the invocation hit the wall limit),
``pass`` (every test passed), else ``fail``. With ``short_circuit`` the tests after the first failure do
not count (the harness stops early where it can tell: a failed assert, a non-zero exit, a timeout).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.verifier.sandbox.interface import ExecRequest, ExecResult, Limits, Sandbox

log = logging.getLogger(__name__)

STATUSES = ("pass", "fail", "timeout", "sandbox_error", "parse_error")
_HARNESS_OVERHEAD_S = 1.0  # harness start-up + per-test process spawns, added to the item's wall limit
_PER_TEST_OVERHEAD_S = 0.05

HARNESS = r"""
import ctypes, io, json, os, select, signal, sys, time, types

try:
    from _sha256 import sha256
except ImportError:  # hashlib would load OpenSSL (slow); the builtin module's name varies by version
    try:
        from _sha2 import sha256
    except ImportError:
        from hashlib import sha256


def digest(data):
    text = data.decode("utf-8", "replace")
    return sha256("\n".join(line.rstrip() for line in text.rstrip().splitlines()).encode()).hexdigest()


def memfd(data=b""):
    fd = os.memfd_create("t")
    if data:
        os.write(fd, data)
        os.lseek(fd, 0, 0)
    return fd


def child(code, test, stdin_fd, out_fd, token, exit_now):
    # the forked test process: fresh stdio, the program, then (assert tests) the statement. What runs
    # after the program is bound here first: a program that replaces builtins.exec, os.write, os._exit,
    # compile or sys.stdout changes those names, not these locals (the statement is compiled already).
    run, write = exec, os.write
    statement = compile(test["assert"], "<test>", "exec") if "assert" in test else None
    os.setpgid(0, 0)
    null = os.open("/dev/null", os.O_WRONLY)
    for target, fd in enumerate((stdin_fd, out_fd, null)):
        os.dup2(fd, target)
    os.closerange(3, 1 << 16)  # the report pipe and every other test's files
    sys.stdin = io.TextIOWrapper(io.open(0, "rb", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.open(1, "wb", closefd=False), encoding="utf-8")
    err = io.open(2, "wb", closefd=False)
    sys.stderr = io.TextIOWrapper(err, encoding="utf-8", errors="backslashreplace")
    flush = sys.stdout.flush
    name = "solution" if statement is not None else "__main__"
    module = types.ModuleType(name)
    module.__file__ = "solution.py"
    sys.modules[name] = module
    sys.argv = ["solution.py"]
    status = 0
    try:
        run(code, module.__dict__)
        if statement is not None:
            run(statement, module.__dict__)
            sys.stdout.flush()  # the program's sys.stdout (it may have replaced ours), then ours
            flush()
            write(1, token)
    except SystemExit as exc:
        status = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        status = 1
    try:
        sys.stdout.flush()  # as interpreter exit flushes it
        flush()
    except BaseException:
        status = status or 120
    exit_now(status & 0xFF)


def wait(pid, timeout):
    # a pidfd: wait with a timeout, no polling, no signal handler
    fd = os.pidfd_open(pid)
    try:
        ready = select.select([fd], [], [], max(timeout, 0))[0]
    finally:
        os.close(fd)
    return os.waitpid(pid, 0)[1] if ready else None


def clean_up(pid):
    # the test's process group, and as pid 1 of the jail everything a test left behind (setsid too)
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    if os.getpid() == 1:
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break


def run_one(code, test, timeout, cap):
    token = os.urandom(16).hex().encode()
    stdin_fd = memfd(test.get("stdin", "").encode())
    out_fd = memfd()
    exit_now = os._exit
    pid = os.fork()
    if pid == 0:
        try:
            child(code, test, stdin_fd, out_fd, token, exit_now)
        finally:
            exit_now(70)
    os.close(stdin_fd)
    status = wait(pid, timeout)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    clean_up(pid)
    got = os.pread(out_fd, cap + 1, 0)
    os.close(out_fd)
    if status is None or (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXCPU):
        return {"ok": False, "timed_out": True, "why": "time limit (%.2fs wall / CPU rlimit)" % timeout}
    exit_code = os.waitstatus_to_exitcode(status)
    if "assert" in test:
        ok = exit_code == 0 and got.endswith(token)
        why = "" if ok else "assertion failed or program exited early (exit %s)" % exit_code
        return {"ok": ok, "timed_out": False, "why": why}
    if len(got) > cap:
        return {"ok": False, "timed_out": False, "why": "stdout exceeded %d bytes" % cap}
    # the expected output never enters the sandbox: the host compares this digest
    return {"exit": exit_code, "digest": digest(got), "head": repr(got[:80]), "timed_out": False}


def main():
    spec = json.loads(sys.stdin.buffer.read())
    sys.stdin.close()
    try:
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
    except Exception:
        pass
    report = os.fdopen(os.dup(1), "w")
    nonce = spec["nonce"]

    def emit(obj):
        report.write(nonce + " " + json.dumps(obj) + "\n")
        report.flush()

    try:
        code = compile(open("solution.py", "rb").read(), "solution.py", "exec")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        emit({"syntax_error": "%s: %s" % (type(exc).__name__, exc)})
        return
    deadline = time.monotonic() + spec["wall_s"]
    for index, test in enumerate(spec["tests"]):
        left = deadline - time.monotonic()
        if left <= 0:
            emit({"i": index, "ok": False, "timed_out": True, "why": "no time left"})
            break
        result = run_one(code, test, left, spec["out_cap"])
        result["i"] = index
        emit(result)
        if spec["short_circuit"] and not result.get("ok", result.get("exit") == 0):
            break
    emit({"done": True})


main()
"""


@dataclass(frozen=True, slots=True)
class CodeVerdict:
    """A code item's verdict: ``reward`` = ``tests_passed / tests_total`` (or 1/0 when short-circuited);
    ``isolation`` names the sandbox backend that ran it."""

    reward: float
    status: str
    detail: str
    tests_passed: int
    tests_total: int
    isolation: str

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if not 0 <= self.tests_passed <= self.tests_total or not 0.0 <= self.reward <= 1.0:
            raise ValueError(
                f"need 0 <= tests_passed ({self.tests_passed}) <= tests_total ({self.tests_total}) "
                f"and reward in [0, 1] (got {self.reward})"
            )


@dataclass(frozen=True, slots=True)
class CodeSettings:
    """Service-wide defaults and caps of code execution (from ``VerifierConfig``)."""

    python: str = "/usr/bin/python3"
    wall_s: float = 10.0
    memory_mb: int = 512
    pids: int = 64
    fsize_mb: int = 16
    output_bytes: int = 1 << 20
    short_circuit: bool = False
    allow_unsandboxed: bool = False


def extract_program(response: str) -> str:
    """The last ```python (or ```py) fenced block, else the last fenced block, else the whole response.

    A linear scan with ``str.find``: no regex backtracking on hostile input.
    """
    blocks: list[tuple[str, str]] = []
    pos = 0
    while (start := response.find("```", pos)) >= 0:
        line_end = response.find("\n", start)
        if line_end < 0:
            break
        end = response.find("```", line_end)
        if end < 0:
            break
        blocks.append((response[start + 3 : line_end].strip().lower(), response[line_end + 1 : end]))
        pos = end + 3
    python_blocks = [body for tag, body in blocks if tag in ("python", "py", "python3")]
    if python_blocks:
        return python_blocks[-1]
    if blocks:
        return blocks[-1][1]
    return response


def _validate_tests(tests: Any) -> list[dict[str, str]]:
    if not isinstance(tests, Sequence) or isinstance(tests, str) or not tests:
        raise ValueError(f"code reference 'tests' must be a non-empty list, got {type(tests).__name__}")
    clean = []
    for i, test in enumerate(tests):
        if isinstance(test, Mapping) and isinstance(test.get("assert"), str):
            clean.append({"assert": test["assert"]})
        elif isinstance(test, Mapping) and isinstance(test.get("expected_stdout"), str):
            clean.append({"stdin": str(test.get("stdin", "")), "expected_stdout": test["expected_stdout"]})
        else:
            raise ValueError(
                f"code reference tests[{i}] must be {{'stdin', 'expected_stdout'}} or {{'assert'}}, "
                f"got {test!r}"
            )
    return clean


def item_limits(settings: CodeSettings, limits: Mapping[str, Any] | None) -> Limits:
    """The execution limits of one item: its own ``wall_s``/``memory_mb`` capped by the service's."""
    limits = limits or {}
    wall = min(float(limits.get("wall_s") or settings.wall_s), settings.wall_s)
    memory = min(int(limits.get("memory_mb") or settings.memory_mb), settings.memory_mb)
    return Limits(
        wall_s=wall,
        memory_mb=max(memory, 32),
        pids=settings.pids,
        fsize_mb=settings.fsize_mb,
        output_bytes=min(settings.output_bytes, 1 << 20),
    )


class CodeScorer:
    """The ``code`` rule: callable as ``rule(response, reference)``. The sandbox is set by ``configure``
    (the REST app and the worker do) or, on first use, probed from ``VerifierConfig`` defaults."""

    def __init__(self) -> None:
        self._sandbox: Sandbox | None = None
        self._settings = CodeSettings()
        self._lock = threading.Lock()

    def configure(self, sandbox: Sandbox, settings: CodeSettings) -> None:
        """Use ``sandbox`` for every later call (the previous one is not closed: its owner closes it)."""
        with self._lock:
            self._sandbox, self._settings = sandbox, settings

    @property
    def settings(self) -> CodeSettings:
        return self._settings

    def sandbox(self) -> Sandbox:
        with self._lock:
            if self._sandbox is None:
                from services.common.config import VerifierConfig
                from services.verifier.sandbox.probe import select_sandbox

                cfg = VerifierConfig()
                self._sandbox, _ = select_sandbox(
                    cfg.sandbox, fallback=cfg.sandbox_fallback, python=cfg.python
                )
            return self._sandbox

    def __call__(self, response: str, reference: Mapping[str, Any]) -> CodeVerdict:
        language = reference.get("language", "python")
        if language != "python":
            raise ValueError(f"code reference language {language!r} is not supported; supported: ['python']")
        tests = _validate_tests(reference.get("tests"))
        settings = self._settings
        sandbox = self.sandbox()
        if sandbox.isolation == "none" and not settings.allow_unsandboxed:
            raise ValueError(
                "code tasks need an isolating sandbox but the backend is 'none'; set verifier.sandbox to "
                "nsjail or bwrap, or verifier.allow_unsandboxed_code=true to accept rlimits-only execution"
            )
        short = bool(reference.get("short_circuit", settings.short_circuit))
        limits = item_limits(settings, reference.get("limits"))
        program = extract_program(response)
        if not program.strip():
            return CodeVerdict(
                0.0, "parse_error", "no program in the response", 0, len(tests), sandbox.isolation
            )
        return self._run(sandbox, program, tests, limits, short, settings.python)

    def _run(
        self,
        sandbox: Sandbox,
        program: str,
        tests: list[dict[str, str]],
        limits: Limits,
        short: bool,
        python: str,
    ) -> CodeVerdict:
        nonce = secrets.token_hex(16)
        out_cap = max((len(t.get("expected_stdout", "").encode()) for t in tests), default=0) + 4096
        inside = [{"assert": t["assert"]} if "assert" in t else {"stdin": t["stdin"]} for t in tests]
        spec = {"nonce": nonce, "tests": inside, "wall_s": limits.wall_s}
        spec |= {"out_cap": out_cap, "short_circuit": short}
        outer = Limits(
            wall_s=min(limits.wall_s + _HARNESS_OVERHEAD_S + _PER_TEST_OVERHEAD_S * len(tests), 3600.0),
            memory_mb=limits.memory_mb,
            pids=limits.pids,
            fsize_mb=limits.fsize_mb,
            output_bytes=limits.output_bytes,
        )
        result = sandbox.run(
            ExecRequest(
                (python, "-I", "harness.py"),
                files={"harness.py": HARNESS.encode(), "solution.py": program.encode()},
                stdin=json.dumps(spec).encode(),
                limits=outer,
            )
        )
        expected = [None if "assert" in t else output_digest(t["expected_stdout"]) for t in tests]
        return verdict_from_run(result, nonce, len(tests), short, expected)


def _report_lines(result: ExecResult, nonce: str) -> list[dict[str, Any]]:
    lines = []
    prefix = nonce + " "
    for raw in result.stdout.decode(errors="replace").splitlines():
        if raw.startswith(prefix):
            try:
                lines.append(json.loads(raw[len(prefix) :]))
            except ValueError:
                continue
    return lines


def output_digest(text: str) -> str:
    """SHA-256 of stdout as compared: lines with trailing whitespace stripped, trailing blank lines
    dropped (the harness computes the same digest of the program's output inside the sandbox)."""
    return hashlib.sha256(
        "\n".join(line.rstrip() for line in text.rstrip().splitlines()).encode()
    ).hexdigest()


def _judge(line: dict[str, Any], expected: Sequence[str | None] | None) -> dict[str, Any]:
    """A stdin/stdout test's report carries the output's digest, compared here with the expected one."""
    if "digest" not in line:
        return line
    index = line.get("i")
    want = (
        expected[index] if expected is not None and isinstance(index, int) and index < len(expected) else None
    )
    ok = line.get("exit") == 0 and want is not None and line["digest"] == want
    why = "" if ok else f"exit {line.get('exit')}, stdout {line.get('head', '')}"
    return {**line, "ok": ok, "why": why}


def verdict_from_run(
    result: ExecResult, nonce: str, total: int, short: bool, expected: Sequence[str | None] | None = None
) -> CodeVerdict:
    """Turn the harness's report into a verdict (status order in the module docstring). ``expected``:
    per test, ``output_digest`` of its expected stdout (None for assert tests)."""
    iso = result.isolation
    if result.status == "sandbox_error":
        return CodeVerdict(0.0, "sandbox_error", result.detail, 0, total, iso)
    lines = _report_lines(result, nonce)
    if any("syntax_error" in line for line in lines):
        why = next(line["syntax_error"] for line in lines if "syntax_error" in line)
        return CodeVerdict(0.0, "parse_error", f"program does not compile: {why}", 0, total, iso)
    tests = [_judge(line, expected) for line in lines if "i" in line]
    if short:  # the harness cannot judge stdout tests: tests after the first failure do not count
        first = next((n for n, t in enumerate(tests) if not t.get("ok")), None)
        tests = tests if first is None else tests[: first + 1]
    passed = sum(bool(t.get("ok")) for t in tests)
    done = any(line.get("done") for line in lines)
    timed_out = result.status == "timeout" or any(t.get("timed_out") for t in tests)
    reward = (1.0 if passed == total else 0.0) if short else passed / total
    first_bad = next((t for t in tests if not t.get("ok")), None)
    detail = f"{passed}/{total} tests passed"
    if first_bad is not None:
        detail += f"; test {first_bad['i']}: {first_bad.get('why', '')}"
    if result.oom_killed:
        detail += "; the memory limit killed a process"
    if passed == total and done:
        return CodeVerdict(1.0, "pass", detail, passed, total, iso)
    if timed_out:
        return CodeVerdict(reward, "timeout", detail, passed, total, iso)
    if not done:
        detail += "; the test harness was killed before it finished"
    return CodeVerdict(reward, "fail", detail, passed, total, iso)


code_rule = CodeScorer()
