"""The host side of stdin/stdout tests: the harness reports a digest of the program's normalised stdout
(expected outputs never enter the sandbox) and ``verdict_from_run`` compares it with the expected one."""

from __future__ import annotations

import hashlib
import json

from services.verifier.rules.code import output_digest, verdict_from_run
from services.verifier.sandbox.interface import ExecResult

NONCE = "n0nce"


def _run(lines: list[dict]) -> ExecResult:
    text = "".join(f"{NONCE} {json.dumps(line)}\n" for line in lines)
    return ExecResult("ok", 0, None, text.encode(), b"", 0.1, "zygote")


def test_digest_ignores_trailing_whitespace_and_blank_lines_only() -> None:
    # "3  \n10\n\n" normalises to "3\n10": trailing spaces per line and trailing blank lines dropped
    want = hashlib.sha256(b"3\n10").hexdigest()
    assert output_digest("3  \n10\n\n") == output_digest("3\n10") == want
    assert output_digest(" 3\n10") != want  # leading whitespace counts
    assert output_digest("3\n\n10") != want  # an inner blank line counts


def test_stdout_tests_pass_only_on_a_matching_digest_and_exit_zero() -> None:
    expected = [output_digest("3"), output_digest("10"), None]
    lines = [
        {"i": 0, "exit": 0, "digest": output_digest("3\n"), "head": "b'3\\n'"},
        {"i": 1, "exit": 1, "digest": output_digest("10"), "head": "b'10'"},  # right output, crashed
        {"i": 2, "ok": True},  # an assert test: judged inside the harness
        {"done": True},
    ]
    verdict = verdict_from_run(_run(lines), NONCE, 3, short=False, expected=expected)
    assert (verdict.status, verdict.tests_passed) == ("fail", 2)
    assert "test 1: exit 1" in verdict.detail


def test_a_digest_without_an_expected_output_never_passes() -> None:
    lines = [{"i": 0, "exit": 0, "digest": output_digest("x"), "head": ""}, {"done": True}]
    assert verdict_from_run(_run(lines), NONCE, 1, short=False).tests_passed == 0
    matched = verdict_from_run(_run(lines), NONCE, 1, short=False, expected=[output_digest("x")])
    assert matched.status == "pass"


def test_short_circuit_ignores_tests_after_the_first_failure() -> None:
    # the harness cannot judge stdout tests, so it ran test 1 although test 0 failed; test 1 timed out
    expected = [output_digest("a"), output_digest("b")]
    lines = [
        {"i": 0, "exit": 0, "digest": output_digest("wrong"), "head": ""},
        {"i": 1, "ok": False, "timed_out": True, "why": "time limit"},
        {"done": True},
    ]
    short = verdict_from_run(_run(lines), NONCE, 2, short=True, expected=expected)
    assert (short.status, short.reward) == ("fail", 0.0)  # not "timeout": test 1 does not count
    full = verdict_from_run(_run(lines), NONCE, 2, short=False, expected=expected)
    assert (full.status, full.reward) == ("timeout", 0.0)
