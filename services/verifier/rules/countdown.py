"""Countdown scorer: reward a response whose answer expression reaches the target (paper Eq. 60).

Reward decision, in order (the first failing step decides; ``status`` in brackets):

1. The expression is the text inside the *last* complete ``<answer>…</answer>`` pair (the format of
   the public Countdown RL recipes). No such pair -> 0.0 [parse_error].
2. Bounded work before parsing. The expression is rejected -> 0.0 [parse_error] when it
   - is longer than ``MAX_EXPRESSION_CHARS`` (256) characters: a Countdown expression over <= 6 small
     numbers needs a few dozen, and the cap bounds everything below (parse, literal sizes, values);
   - holds a character other than digits, ``+ - * / ( )`` and whitespace, or the operator ``**``
     or ``//`` (not in the whitelist; ``9**9**9**9`` never reaches the parser);
   - has unbalanced parentheses or nests them deeper than ``MAX_PAREN_DEPTH`` (a linear scan, so
     ``ast.parse`` never sees pathological nesting);
   - holds an integer literal with more digits than the longest given number (it cannot be one of
     them, and this keeps big-integer arithmetic off the table).
3. ``ast.parse`` in eval mode, then a node whitelist: integer literals, binary ``+ - * /``, unary
   minus. Anything else (unary plus, calls, implicit multiplication, leading-zero literals) -> 0.0.
4. The multiset of literals must equal the multiset of given numbers (each used exactly once),
   else 0.0 [parse_error].
5. Exact ``Fraction`` evaluation; division by zero -> 0.0 [parse_error].

An expression that passes 1-5 is *well-formed*: reward 1.0 [pass] if its value equals the target
exactly, else 0.1 [fail] (a non-integer value such as 7/2 never equals an integer target).
"""

from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from services.common.data.countdown import ANSWER_CLOSE, ANSWER_OPEN

MAX_EXPRESSION_CHARS = 256
MAX_PAREN_DEPTH = 32
REWARD_PASS = 1.0
REWARD_WELL_FORMED = 0.1
REWARD_INVALID = 0.0

_REWARD_BY_STATUS = {"pass": REWARD_PASS, "fail": REWARD_WELL_FORMED, "parse_error": REWARD_INVALID}
_ALLOWED_CHARS = frozenset("0123456789+-*/() \t\r\n")
_BIN_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div)


@dataclass(frozen=True, slots=True)
class CountdownVerdict:
    """The scorer's verdict. ``reward`` is fixed by ``status``: pass 1.0, fail 0.1, parse_error 0.0.
    ``expression`` is the extracted answer text (None when no answer tag was found)."""

    reward: float
    status: str
    detail: str
    expression: str | None

    def __post_init__(self) -> None:
        expected = _REWARD_BY_STATUS.get(self.status)
        if expected is None:
            raise ValueError(f"status must be one of {sorted(_REWARD_BY_STATUS)}, got {self.status!r}")
        if self.reward != expected:
            raise ValueError(f"status {self.status!r} carries reward {expected}, got {self.reward}")


class _Rejected(Exception):
    """Internal: the expression is not well-formed; the message is the verdict's detail."""


def _invalid(detail: str, expression: str | None) -> CountdownVerdict:
    return CountdownVerdict(REWARD_INVALID, "parse_error", detail, expression)


def extract_answer(response: str) -> str | None:
    """The text inside the last complete ``<answer>…</answer>`` pair, or None.

    Two ``rfind`` calls: linear in the response, no regex backtracking on hostile input.
    """
    close = response.rfind(ANSWER_CLOSE)
    if close < 0:
        return None
    open_ = response.rfind(ANSWER_OPEN, 0, close)
    if open_ < 0:
        return None
    return response[open_ + len(ANSWER_OPEN) : close]


def _prescan(expression: str, max_digits: int) -> None:
    """Linear checks that bound the parser's and the evaluator's work (steps 2 of the docstring)."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise _Rejected(f"expression has {len(expression)} characters, the limit is {MAX_EXPRESSION_CHARS}")
    depth = digits = 0
    prev = ""
    for ch in expression:
        if ch not in _ALLOWED_CHARS:
            raise _Rejected(f"character {ch!r} is not allowed (only digits, + - * / ( ) and spaces)")
        if ch in "*/" and prev == ch:
            raise _Rejected(f"operator {ch * 2!r} is not allowed (only + - * /)")
        if ch == "(":
            depth += 1
            if depth > MAX_PAREN_DEPTH:
                raise _Rejected(f"parentheses nest deeper than {MAX_PAREN_DEPTH}")
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise _Rejected("unbalanced parentheses: ')' without a matching '('")
        digits = digits + 1 if ch.isdigit() else 0
        if digits > max_digits:
            raise _Rejected(f"an integer literal has more digits than any given number ({max_digits})")
        prev = ch
    if depth:
        raise _Rejected(f"unbalanced parentheses: {depth} '(' never closed")


def _evaluate(node: ast.expr, literals: list[int]) -> Fraction:
    """Exact value of a whitelisted node; appends every integer literal to ``literals``.

    Recursion depth is bounded by the 256-character cap (at most ~128 operators).
    """
    if isinstance(node, ast.Constant) and type(node.value) is int:
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, literals)
    if isinstance(node, ast.BinOp) and isinstance(node.op, _BIN_OPS):
        left = _evaluate(node.left, literals)
        right = _evaluate(node.right, literals)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if right == 0:
            raise _Rejected("division by zero")
        return left / right
    raise _Rejected(f"syntax {type(node).__name__} is not allowed (only integers, + - * /, unary minus)")


def score_countdown(response: str, nums: Sequence[int], target: int) -> CountdownVerdict:
    """Score one response against a Countdown problem (decision in the module docstring).

    ``nums`` and ``target`` come from the task, not the model: a malformed reference raises
    ``ValueError`` instead of scoring 0, so a data bug never passes as a bad response.
    """
    if any(type(n) is not int or n < 0 for n in nums) or type(target) is not int:
        raise ValueError(
            f"countdown reference must be non-negative integer nums and an integer target, "
            f"got nums={list(nums)!r} target={target!r}"
        )
    expression = extract_answer(response)
    if expression is None:
        return _invalid(f"no {ANSWER_OPEN}...{ANSWER_CLOSE} pair in the response", None)
    max_digits = max((len(str(n)) for n in nums), default=1)
    try:
        _prescan(expression, max_digits)
        try:
            # Newlines/tabs inside the tag are layout, not syntax; eval mode rejects a bare newline.
            tree = ast.parse(" ".join(expression.split()), mode="eval")
        except SyntaxError as exc:
            raise _Rejected(f"not a valid expression: {exc.msg}") from None
        literals: list[int] = []
        value = _evaluate(tree.body, literals)
    except _Rejected as exc:
        return _invalid(str(exc), expression)
    if Counter(literals) != Counter(nums):
        return _invalid(
            f"numbers used {sorted(literals)} differ from the given numbers {sorted(nums)} "
            f"(each must be used exactly once)",
            expression,
        )
    if value == target:
        return CountdownVerdict(REWARD_PASS, "pass", f"reaches the target {target}", expression)
    return CountdownVerdict(
        REWARD_WELL_FORMED, "fail", f"well-formed, but evaluates to {value}, not {target}", expression
    )


def countdown_rule(response: str, reference: Mapping[str, Any]) -> CountdownVerdict:
    """Registry entry: ``reference`` holds the task's ``nums`` and ``target``."""
    missing = [key for key in ("nums", "target") if key not in reference]
    if missing:
        raise ValueError(
            f"countdown reference lacks {missing}; it needs 'nums' and 'target', got keys {sorted(reference)}"
        )
    return score_countdown(response, reference["nums"], reference["target"])
