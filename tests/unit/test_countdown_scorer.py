"""Countdown scorer: hand-worked rewards, the well-formedness boundary, hostile input, the registry."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.data.countdown import format_answer, generate_problems
from services.verifier.rules import RULES, get_rule
from services.verifier.rules.countdown import (
    MAX_EXPRESSION_CHARS,
    MAX_PAREN_DEPTH,
    CountdownVerdict,
    extract_answer,
    score_countdown,
)

NUMS = [3, 5, 2]
TARGET = 13  # 3*5-2 = 15-2 = 13

# A generous wall-clock bound that only catches a hang or a super-linear blow-up; not a perf assertion.
HANG_BOUND_S = 1.0


def _score(expression: str, nums: list[int] = NUMS, target: int = TARGET) -> CountdownVerdict:
    return score_countdown(format_answer(expression), nums, target)


def _timed(response: str, nums: list[int], target: int) -> tuple[CountdownVerdict, float]:
    start = time.perf_counter()
    verdict = score_countdown(response, nums, target)
    return verdict, time.perf_counter() - start


# --- the three reward levels -------------------------------------------------------------------


def test_correct_answer_scores_one() -> None:
    verdict = _score("3*5-2")  # 15 - 2 = 13
    assert (verdict.reward, verdict.status, verdict.expression) == (1.0, "pass", "3*5-2")


def test_wrong_value_scores_point_one() -> None:
    verdict = _score("3+5+2")  # 10 != 13, but every number used once: well-formed
    assert (verdict.reward, verdict.status) == (0.1, "fail")
    assert "10" in verdict.detail


@pytest.mark.parametrize(
    "expression",
    [
        "3*5-2+2",  # 2 used twice
        "3*5",  # 2 missing
        "3*5-2+1",  # 1 is not a given number
        "5+5+3",  # 5 used twice, 2 missing
    ],
)
def test_wrong_numbers_score_zero(expression: str) -> None:
    verdict = _score(expression)
    assert (verdict.reward, verdict.status) == (0.0, "parse_error")
    assert "exactly once" in verdict.detail


def test_duplicate_given_numbers_are_a_multiset() -> None:
    # nums [4, 4, 2]: 4*4/2 = 8 uses both 4s; 4*2 = 8 uses only one of them.
    assert _score("4*4/2", [4, 4, 2], 8).reward == 1.0
    assert _score("4*2", [4, 4, 2], 8).reward == 0.0


def test_last_answer_tag_wins() -> None:
    wrong, right = format_answer("3+5+2"), format_answer("3*5-2")
    assert score_countdown(f"try {wrong} then {right}", NUMS, TARGET).reward == 1.0
    assert score_countdown(f"try {right} then {wrong}", NUMS, TARGET).reward == 0.1
    # An unclosed trailing tag is not a pair: the last complete pair still counts.
    assert score_countdown(f"{right} <answer>3+5", NUMS, TARGET).reward == 1.0


def test_unary_minus_is_allowed() -> None:
    # -(2*3)+10 = -6+10 = 4
    assert _score("-(2*3)+10", [2, 3, 10], 4).reward == 1.0
    # 2 - -3 + 10 = 15: unary minus on a literal still uses 3
    assert _score("2--3+10", [2, 3, 10], 15).reward == 1.0


def test_division_is_exact_fractions() -> None:
    # 1/49*49 = (1/49)*49 = 1 exactly; in floating point it is 0.9999999999999999, so a float scorer
    # would give 0.1 here.
    assert 1 / 49 * 49 != 1
    assert _score("1/49*49", [1, 49, 49], 1).reward == 1.0


def test_non_integer_value_never_hits_an_integer_target() -> None:
    # 7/2 = 3.5: neither 3 nor 4 (no floor, no rounding); well-formed, so 0.1.
    verdict = _score("7/2", [7, 2], 3)
    assert (verdict.reward, verdict.status) == (0.1, "fail")
    assert "7/2" in verdict.detail


def test_whitespace_and_newlines_inside_the_tag_are_layout() -> None:
    assert _score(" 3 * 5\n - 2 ").reward == 1.0
    assert _score("(3 *\n\t5) - 2").reward == 1.0


# --- not well-formed: 0.0 ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "nums", "target", "why"),
    [
        ("1/(2-2)", [1, 2, 2], 1, "division by zero"),
        ("+3*5-2", NUMS, TARGET, "UnaryOp"),  # unary plus is not whitelisted
        ("(3)(5)-2", NUMS, TARGET, "Call"),  # implicit multiplication parses as a call
        ("2**3", [2, 3], 8, "'**'"),
        ("7//2", [7, 2], 3, "'//'"),
        ("1.5*2", [1, 5, 2], 3, "'.'"),
        ("__import__('os')", NUMS, TARGET, "'_'"),
        ("03*5-2", [30, 5, 2], 13, "not a valid expression"),  # leading zero: a SyntaxError
        ("(3*5-2", NUMS, TARGET, "never closed"),
        ("3*5)-2", NUMS, TARGET, "without a matching"),
        ("3*5-2=13", NUMS, TARGET, "'='"),
        ("", NUMS, TARGET, "not a valid expression"),
        ("3*5-22222", NUMS, TARGET, "more digits"),  # 5 digits: cannot be one of 1-digit numbers
    ],
)
def test_disallowed_syntax_scores_zero(expression: str, nums: list[int], target: int, why: str) -> None:
    verdict = _score(expression, nums, target)
    assert (verdict.reward, verdict.status) == (0.0, "parse_error")
    assert why in verdict.detail


def test_missing_tag_scores_zero() -> None:
    for response in ("3*5-2", "<answer>3*5-2", "3*5-2</answer>", "</answer>3*5-2<answer>"):
        verdict = score_countdown(response, NUMS, TARGET)
        assert (verdict.reward, verdict.status, verdict.expression) == (0.0, "parse_error", None)


def test_paren_depth_cap() -> None:
    # Depth exactly at the cap parses; one deeper is refused by the linear scan before ast.parse.
    ok = "(" * MAX_PAREN_DEPTH + "3*5-2" + ")" * MAX_PAREN_DEPTH
    deep = "(" + ok + ")"
    assert len(deep) <= MAX_EXPRESSION_CHARS  # so it is the depth check, not the length cap, that fires
    assert _score(ok).reward == 1.0
    verdict = _score(deep)
    assert verdict.reward == 0.0 and "nest deeper" in verdict.detail


def test_length_cap() -> None:
    padded = "3*5-2" + " " * (MAX_EXPRESSION_CHARS - 5)
    assert _score(padded).reward == 1.0
    verdict = _score(padded + " ")
    assert verdict.reward == 0.0 and f"limit is {MAX_EXPRESSION_CHARS}" in verdict.detail


# --- hostile input: bounded time -------------------------------------------------------------------


def test_power_tower_is_rejected_fast() -> None:
    # 9**9**9**9 would never finish if evaluated; '**' is refused by the character scan.
    verdict, elapsed = _timed(format_answer("9**9**9**9"), [9, 9, 9, 9], 9)
    assert verdict.reward == 0.0 and "'**'" in verdict.detail
    assert elapsed < HANG_BOUND_S


def test_million_digit_integer_is_rejected_fast() -> None:
    verdict, elapsed = _timed(format_answer("1" * 10**6), [1, 1], 2)
    assert verdict.reward == 0.0 and "characters" in verdict.detail
    assert elapsed < HANG_BOUND_S


def test_ten_thousand_deep_parentheses_are_rejected_fast() -> None:
    response = format_answer("(" * 10_000 + "3*5-2" + ")" * 10_000)
    verdict, elapsed = _timed(response, NUMS, TARGET)
    assert verdict.reward == 0.0
    assert elapsed < HANG_BOUND_S


@pytest.mark.parametrize(
    "response",
    [
        "x" * 10**6,  # no tags at all
        "<answer>" * (10**6 // 8),  # many opens, no close
        "</answer>" * (10**6 // 9),  # many closes, no open
        "<answer>" * (10**6 // 8) + "3*5-2</answer>",  # the answer after 1 MB of opens
        "y" * 10**6 + format_answer("3*5-2"),  # a long preamble, then a correct answer
    ],
    ids=["junk", "opens", "closes", "opens-then-answer", "preamble-then-answer"],
)
def test_megabyte_response_is_fast(response: str) -> None:
    verdict, elapsed = _timed(response, NUMS, TARGET)
    assert elapsed < HANG_BOUND_S
    expected = 1.0 if response.endswith("3*5-2</answer>") else 0.0
    assert verdict.reward == expected


# --- properties -------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_every_generated_solution_scores_one(seed: int) -> None:
    for problem in generate_problems(10, seed):
        verdict = score_countdown(format_answer(problem.solution), problem.nums, problem.target)
        assert verdict.reward == 1.0, (problem, verdict)


_RESPONSE_CHARS = st.sampled_from(list("0123456789+-*/() \n.=x_") + ["**", "<answer>", "</answer>"])


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(_RESPONSE_CHARS, max_size=60))
def test_scorer_is_total_and_rewards_match_status(parts: list[str]) -> None:
    # Any text scores without raising, and the reward is one of the three levels tied to its status.
    verdict = score_countdown("".join(parts), NUMS, TARGET)
    assert (verdict.status, verdict.reward) in {("pass", 1.0), ("fail", 0.1), ("parse_error", 0.0)}


# --- verdict, extraction, reference validation, registry ------------------------------------------


def test_verdict_rejects_reward_inconsistent_with_status() -> None:
    with pytest.raises(ValueError, match="carries reward 0.1"):
        CountdownVerdict(1.0, "fail", "", None)
    with pytest.raises(ValueError, match="status must be one of"):
        CountdownVerdict(1.0, "ok", "", None)


def test_extract_answer() -> None:
    assert extract_answer("a<answer>1</answer>b<answer>2</answer>c") == "2"
    assert extract_answer("<answer><answer>7</answer>") == "7"
    assert extract_answer("no tags") is None


def test_bad_reference_raises_instead_of_scoring() -> None:
    with pytest.raises(ValueError, match="countdown reference"):
        score_countdown(format_answer("1+2"), [True, 2], 3)
    with pytest.raises(ValueError, match="countdown reference"):
        score_countdown(format_answer("1+2"), [1, 2], 3.0)  # type: ignore[arg-type]


def test_registry_countdown_entry() -> None:
    rule = get_rule("countdown")
    assert RULES["countdown"] is rule
    assert rule(format_answer("3*5-2"), {"nums": NUMS, "target": TARGET}).reward == 1.0
    assert rule(format_answer("3+5+2"), {"nums": (3, 5, 2), "target": 13, "extra": 1}).reward == 0.1
    with pytest.raises(ValueError, match="lacks \\['target'\\]"):
        rule(format_answer("3*5-2"), {"nums": NUMS})


def test_unknown_kind_is_an_error_listing_valid_kinds() -> None:
    with pytest.raises(ValueError, match="unknown task kind 'sudoku'.*countdown"):
        get_rule("sudoku")
