"""Pure parts of the verifier: exact/regex rules, program extraction, the code verdict from a harness
report, limits, the REST item -> reference mapping, and the bind/auth guards. No sandbox, no pool."""

from __future__ import annotations

import json
import time

import pytest
from pydantic import SecretStr, ValidationError

from services.common.config import ConfigError, VerifierConfig
from services.verifier.__main__ import check_bind, is_loopback
from services.verifier.api_models import CodeItem, CountdownItem, RegexItem, VerifyRequest
from services.verifier.app import API_KEYS_ENV, api_keys
from services.verifier.rules import RULES, code_settings, get_rule
from services.verifier.rules.code import (
    CodeSettings,
    CodeVerdict,
    extract_program,
    item_limits,
    verdict_from_run,
)
from services.verifier.rules.exact import MATCH_TIMEOUT_S, exact_rule, regex_rule
from services.verifier.rules.math import math_rule
from services.verifier.rules.verdict import BinaryVerdict
from services.verifier.sandbox.interface import ExecRequest, ExecResult, Limits

NONCE = "n0nce"


def _run(lines: list[dict], status: str = "ok", stdout_extra: str = "", oom: bool = False) -> ExecResult:
    text = stdout_extra + "".join(f"{NONCE} {json.dumps(line)}\n" for line in lines)
    return ExecResult(status, 0, None, text.encode(), b"", 0.1, "nsjail", oom_killed=oom)  # type: ignore[arg-type]


# --- registry ------------------------------------------------------------------------------------


def test_registry_has_every_kind_and_names_them_on_error() -> None:
    assert set(RULES) == {"countdown", "math", "code", "exact", "regex"}
    with pytest.raises(ValueError, match=r"unknown task kind 'cobol'.*'code'"):
        get_rule("cobol")


# --- exact / regex -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "reference", "status"),
    [
        ("  Paris\n", {"answer": "Paris"}, "pass"),  # ends stripped
        ("New   York", {"answer": "New York"}, "pass"),  # whitespace runs collapsed
        ("paris", {"answer": "Paris"}, "fail"),  # case-sensitive by default
        ("paris", {"answer": "Paris", "case_sensitive": False}, "pass"),
        ("so <answer> 42 </answer>", {"answer": "42", "extract": "answer_tag"}, "pass"),
        ("so 42", {"answer": "42", "extract": "answer_tag"}, "parse_error"),
    ],
)
def test_exact_rule(response: str, reference: dict, status: str) -> None:
    verdict = exact_rule(response, reference)
    assert verdict.status == status
    assert verdict.reward == (1.0 if status == "pass" else 0.0)


def test_regex_rule_modes_and_reference_errors() -> None:
    assert regex_rule("answer: 42", {"pattern": r"\d+", "mode": "search"}).status == "pass"
    assert regex_rule("answer: 42", {"pattern": r"\d+"}).status == "fail"  # fullmatch by default
    assert regex_rule("ABC", {"pattern": "abc", "ignore_case": True}).status == "pass"
    with pytest.raises(ValueError, match="does not compile"):
        regex_rule("x", {"pattern": "("})
    with pytest.raises(ValueError, match="'mode'"):
        regex_rule("x", {"pattern": "x", "mode": "prefix"})


def test_regex_rule_times_out_on_catastrophic_backtracking() -> None:
    # (a|aa)+ before a mismatch: exponentially many ways to split the run of a's; Python's re would hang.
    start = time.monotonic()
    verdict = regex_rule("a" * 40 + "!", {"pattern": r"(a|aa)+$", "mode": "search"})
    assert (verdict.status, verdict.reward) == ("timeout", 0.0)
    assert time.monotonic() - start < 10 * MATCH_TIMEOUT_S  # bounded, not a hang (generous: shared CPU)


# --- math (host-side decisions only; the pool is tested in integration) --------------------------


def test_math_rule_without_boxed_is_a_parse_error_decided_without_a_worker() -> None:
    verdict = math_rule("the answer is 4", {"answer": "4"})
    assert (verdict.status, verdict.reward, verdict.isolation) == ("parse_error", 0.0, "process_pool")
    with pytest.raises(ValueError, match="non-empty 'answer'"):
        math_rule("\\boxed{4}", {"answer": ""})
    with pytest.raises(ValueError, match="cannot carry reward"):
        BinaryVerdict(1.0, "fail", "")


# --- code: program extraction --------------------------------------------------------------------


def test_extract_program_prefers_the_last_python_fence() -> None:
    text = "intro\n```python\nprint(1)\n```\nthen\n```\nplain\n```\nfinally\n```py\nprint(2)\n```\n"
    assert extract_program(text) == "print(2)\n"
    assert extract_program("```\nonly plain\n```") == "only plain\n"
    assert extract_program("print(3)") == "print(3)"  # no fence: the whole response
    assert extract_program("```python\nunterminated") == "```python\nunterminated"


# --- code: verdict from the harness report (Eq. 61) ----------------------------------------------


def test_reward_is_the_fraction_of_tests_passed() -> None:
    lines = [
        {"i": 0, "ok": True},
        {"i": 1, "ok": False, "why": "exit 1"},
        {"i": 2, "ok": True},
        {"done": True},
    ]
    verdict = verdict_from_run(_run(lines), NONCE, 3, short=False)
    # 2 of 3 tests: reward 2/3 (paper Eq. 61), status fail
    assert (verdict.status, verdict.tests_passed, verdict.tests_total) == ("fail", 2, 3)
    assert verdict.reward == pytest.approx(2 / 3)
    assert "test 1: exit 1" in verdict.detail


def test_all_passed_is_pass_and_short_circuit_is_binary() -> None:
    lines = [{"i": 0, "ok": True}, {"i": 1, "ok": True}, {"done": True}]
    assert verdict_from_run(_run(lines), NONCE, 2, short=False).status == "pass"
    partial = [{"i": 0, "ok": True}, {"i": 1, "ok": False}, {"done": True}]
    verdict = verdict_from_run(_run(partial), NONCE, 3, short=True)
    assert (verdict.status, verdict.reward) == ("fail", 0.0)


def test_lines_without_the_nonce_are_ignored() -> None:
    forged = 'xx {"i": 0, "ok": true}\n{"i": 0, "ok": true}\n'
    verdict = verdict_from_run(
        _run([{"i": 0, "ok": False}, {"done": True}], stdout_extra=forged), NONCE, 1, False
    )
    assert (verdict.status, verdict.tests_passed) == ("fail", 0)


def test_status_order_sandbox_error_parse_error_timeout() -> None:
    broken = ExecResult("sandbox_error", None, None, b"", b"", 0.0, "bwrap", detail="bwrap: no userns")
    verdict = verdict_from_run(broken, NONCE, 4, short=False)
    assert (verdict.status, verdict.reward, verdict.detail) == ("sandbox_error", 0.0, "bwrap: no userns")
    syntax = verdict_from_run(_run([{"syntax_error": "SyntaxError: bad"}]), NONCE, 2, short=False)
    assert syntax.status == "parse_error" and "SyntaxError" in syntax.detail
    slow = [{"i": 0, "ok": True}, {"i": 1, "ok": False, "timed_out": True}, {"done": True}]
    verdict = verdict_from_run(_run(slow), NONCE, 2, short=False)
    assert (verdict.status, verdict.reward) == ("timeout", 0.5)
    cut = verdict_from_run(_run([{"i": 0, "ok": True}], status="timeout"), NONCE, 2, short=False)
    assert (cut.status, cut.tests_passed) == ("timeout", 1)


def test_a_killed_harness_is_a_failure_not_a_sandbox_error() -> None:
    verdict = verdict_from_run(_run([{"i": 0, "ok": True}]), NONCE, 2, short=False)
    assert verdict.status == "fail" and "harness was killed" in verdict.detail
    assert verdict.reward == 0.5


def test_code_verdict_invariants() -> None:
    with pytest.raises(ValueError, match="tests_passed"):
        CodeVerdict(1.0, "pass", "", 3, 2, "nsjail")
    with pytest.raises(ValueError, match="status must be one of"):
        CodeVerdict(0.0, "error", "", 0, 1, "nsjail")


# --- limits ----------------------------------------------------------------------------------------


def test_item_limits_are_capped_by_the_service() -> None:
    settings = CodeSettings(wall_s=10.0, memory_mb=512)
    assert item_limits(settings, {"wall_s": 60, "memory_mb": 4096}).wall_s == 10.0
    assert item_limits(settings, {"wall_s": 60, "memory_mb": 4096}).memory_mb == 512
    assert item_limits(settings, {"wall_s": 2}).wall_s == 2.0
    assert item_limits(settings, None).memory_mb == 512


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({"wall_s": 0}, "Limits.wall_s=0"), ({"memory_mb": 1}, "Limits.memory_mb=1"), ({"pids": 0}, "pids")],
)
def test_limits_name_the_bad_field(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        Limits(**kwargs)


def test_exec_request_rejects_relative_programs_and_escaping_files() -> None:
    with pytest.raises(ValueError, match="absolute program path"):
        ExecRequest(("python3", "x.py"))
    with pytest.raises(ValueError, match="relative path"):
        ExecRequest(("/usr/bin/python3",), files={"../etc/passwd": b""})


def test_code_settings_follow_the_config() -> None:
    cfg = VerifierConfig(timeout_s=3.0, memory_mb=256, allow_unsandboxed_code=True, code_short_circuit=True)
    settings = code_settings(cfg)
    assert (settings.wall_s, settings.memory_mb, settings.allow_unsandboxed, settings.short_circuit) == (
        3.0,
        256,
        True,
        True,
    )


# --- REST models: an item's reference is what a queue task's reference would be ------------------


def test_item_reference_matches_the_queue_reference() -> None:
    item = CountdownItem(id="a", task="countdown", response="r", nums=[3, 5, 2], target=13)
    assert item.reference() == {"nums": [3, 5, 2], "target": 13}
    code = CodeItem.model_validate(
        {
            "id": "c",
            "task": "code",
            "response": "r",
            "tests": [{"assert": "assert f()"}, {"expected_stdout": "1"}],
        }
    )
    assert code.reference() == {
        "language": "python",
        "tests": [{"assert": "assert f()"}, {"stdin": "", "expected_stdout": "1"}],
    }


def test_schema_errors_name_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        VerifyRequest.model_validate(
            {"items": [{"id": "a", "task": "countdown", "response": "", "nums": [1]}]}
        )
    assert "target" in str(info.value)
    with pytest.raises(ValidationError, match="does not compile"):
        RegexItem(id="r", task="regex", response="", pattern="(")
    with pytest.raises(ValidationError, match="task"):
        VerifyRequest.model_validate({"items": [{"id": "a", "task": "haskell", "response": ""}]})


# --- bind and auth guards --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.5.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
     ("10.1.2.3", False), ("example.org", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_no_key_refuses_a_public_bind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    with pytest.raises(ConfigError, match="refusing to bind '0.0.0.0' without an API key"):
        check_bind(VerifierConfig(), "0.0.0.0")
    check_bind(VerifierConfig(), "127.0.0.1")
    check_bind(VerifierConfig(api_keys=(SecretStr("k"),)), "0.0.0.0")
    monkeypatch.setenv(API_KEYS_ENV, " a, ,b ")
    assert api_keys(VerifierConfig(api_keys=(SecretStr("k"),))) == ("k", "a", "b")
    check_bind(VerifierConfig(), "0.0.0.0")
