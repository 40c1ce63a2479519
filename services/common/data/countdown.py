"""Countdown problems: a seeded generator of reachable problems and the prompt format.

A problem is a list of numbers and a target; a solution is an arithmetic expression that uses every
number exactly once with ``+ - * /`` and reaches the target exactly. The generator builds a random
expression first and takes its value as the target, so every generated problem is reachable and
comes with one known solution (used to SFT the tiny base model).

Datasets in the public Countdown-Tasks format (rows with ``nums`` and ``target``; extra fields are
ignored) load from JSON Lines or Parquet with ``load_countdown_tasks``; ``save_countdown_tasks``
writes JSON Lines (e.g. to ship a held-out set).
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from services.common.data.rows import JSONL_SUFFIXES, DatasetError, read_rows, resolve_data_path, short
from services.common.data.rows import matching as _matching

ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
_OPS = ("+", "-", "*", "/")


@dataclass(frozen=True, slots=True)
class CountdownProblem:
    """One Countdown problem. ``solution`` is one known expression reaching ``target`` (may be empty
    for problems loaded from a dataset)."""

    nums: tuple[int, ...]
    target: int
    solution: str = ""

    def __post_init__(self) -> None:
        if not 2 <= len(self.nums) <= 6:
            raise ValueError(f"nums must hold 2..6 numbers, got {len(self.nums)}: {self.nums}")
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in self.nums):
            raise ValueError(f"nums must be non-negative integers, got {self.nums}")
        if not isinstance(self.target, int) or isinstance(self.target, bool):
            raise ValueError(f"target must be an integer, got {self.target!r}")


def format_prompt(nums: tuple[int, ...] | list[int], target: int) -> str:
    """The prompt the tiny model is trained on and the pipeline samples from.

    Kept short because the tiny model is character-level: every prompt character costs a token.
    """
    return f"Use {' '.join(str(n) for n in nums)} to make {target}.\n"


def format_answer(expression: str) -> str:
    """The response format of the public Countdown RL recipes: the expression inside answer tags."""
    return f"{ANSWER_OPEN}{expression}{ANSWER_CLOSE}"


def _random_expression(rng: random.Random, nums: list[int]) -> tuple[str, Fraction] | None:
    """Combine ``nums`` (in a random order) into one random expression tree; None when a division by
    zero or a non-integer intermediate makes the draw unusable."""
    items: list[tuple[str, Fraction, bool]] = [(str(n), Fraction(n), True) for n in nums]
    rng.shuffle(items)
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        (a_s, a_v, a_atom), (b_s, b_v, b_atom) = items[i], items[j]
        op = rng.choice(_OPS)
        if op == "/" and (b_v == 0 or a_v % b_v != 0):
            return None
        value = {"+": a_v + b_v, "-": a_v - b_v, "*": a_v * b_v, "/": a_v / b_v if b_v else None}[op]
        if value is None or value < 0 or value.denominator != 1:
            return None
        # Parenthesise compound operands; exactness over prettiness (the scorer parses either).
        a_txt = a_s if a_atom else f"({a_s})"
        b_txt = b_s if b_atom else f"({b_s})"
        merged = (f"{a_txt}{op}{b_txt}", value, False)
        items = [it for k, it in enumerate(items) if k not in (i, j)] + [merged]
    expr, value, _ = items[0]
    return expr, value


def generate_problems(
    n: int,
    seed: int,
    *,
    min_nums: int = 3,
    max_nums: int = 4,
    max_num: int = 20,
    max_target: int = 100,
) -> list[CountdownProblem]:
    """``n`` reachable problems, deterministic in ``seed``.

    Numbers are drawn from ``1..max_num``; targets are the value of a random expression over all of
    them, kept when it is an integer in ``1..max_target`` (so every problem has a known solution).
    """
    if n < 0 or min_nums < 2 or max_nums < min_nums or max_num < 1 or max_target < 1:
        raise ValueError(
            f"bad generator arguments: n={n} min_nums={min_nums} max_nums={max_nums} "
            f"max_num={max_num} max_target={max_target}"
        )
    rng = random.Random(seed)
    out: list[CountdownProblem] = []
    while len(out) < n:
        nums = [rng.randint(1, max_num) for _ in range(rng.randint(min_nums, max_nums))]
        drawn = _random_expression(rng, nums)
        if drawn is None:
            continue
        expr, value = drawn
        if 1 <= value <= max_target:
            out.append(CountdownProblem(nums=tuple(nums), target=int(value), solution=expr))
    return out


# ---------------------------------------------------------------------------------------------------
# Loading and saving datasets

_NUMS_RULE = "must be a list of 2..6 non-negative integers"
_TARGET_RULE = "must be an integer"


def _as_int(value: Any) -> int | None:
    """``value`` as an int if it is one (an integral float counts: pandas writes float columns);
    None for bools, non-integral or non-finite floats and anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _as_nums(value: Any) -> tuple[int, ...] | None:
    """``value`` as 2..6 non-negative integers, or None."""
    if not isinstance(value, list | tuple) or not 2 <= len(value) <= 6:
        return None
    nums = [_as_int(n) for n in value]
    if any(n is None or n < 0 for n in nums):
        return None
    return tuple(n for n in nums if n is not None)


def _parse_row(row: Any, where: str) -> CountdownProblem:
    """One dataset row -> problem; ``where`` is ``"<file>: row <n>"`` for error messages."""
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected an object with 'nums' and 'target', got {short(row)}")
    for field in ("nums", "target"):
        if field not in row:
            raise DatasetError(f"{where}: field {field!r} is missing (present: {sorted(row)}); add it")
    raw_nums, raw_target = row["nums"], row["target"]
    nums = _as_nums(raw_nums)
    if nums is None:
        raise DatasetError(f"{where}: field 'nums' {_NUMS_RULE}, got {short(raw_nums)}")
    target = _as_int(raw_target)
    if target is None:
        raise DatasetError(f"{where}: field 'target' {_TARGET_RULE}, got {short(raw_target)}")
    solution = row.get("solution") or ""
    if not isinstance(solution, str):
        raise DatasetError(f"{where}: field 'solution' must be a string or absent, got {short(solution)}")
    return CountdownProblem(nums=nums, target=target, solution=solution)


def load_countdown_tasks(
    path: str | os.PathLike[str], where: Mapping[str, Any] | None = None
) -> list[CountdownProblem]:
    """Problems from a Countdown-Tasks file: JSON Lines (``.jsonl``/``.json``, one object per line)
    or Parquet (``.parquet``, needs pyarrow), local or ``hf://datasets/...`` (``rows.resolve_data_path``).
    Each row needs ``nums`` (2..6 non-negative integers)
    and ``target`` (an integer); ``solution`` is kept if present, other fields are ignored.

    Raises ``DatasetError`` naming the file, the 1-based row, the field and the bad value for a
    malformed row, and for an empty file.
    """
    path = resolve_data_path(path)
    example = '{"nums": [1, 2, 3], "target": 6}'
    rows = read_rows(path, ("nums", "target"), ("solution",), example=example, where=where)
    problems = [_parse_row(row, f"{path}: row {n}") for n, row in rows]
    if not problems:
        raise DatasetError(
            f"{path}: the file holds no rows{_matching(where)}; expected one or more with 'nums' and 'target'"
        )
    return problems


def save_countdown_tasks(problems: Iterable[CountdownProblem], path: str | os.PathLike[str]) -> Path:
    """Write ``problems`` as JSON Lines (``nums``, ``target``, ``solution``) that
    ``load_countdown_tasks`` reads back unchanged; returns the path.

    Written to a temporary file and renamed, so a reader never sees half a dataset.
    """
    path = Path(path)
    if path.suffix.lower() not in JSONL_SUFFIXES:
        raise ValueError(f"{path}: save writes JSON Lines; give a path ending in {list(JSONL_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for p in problems:
            fh.write(json.dumps({"nums": list(p.nums), "target": p.target, "solution": p.solution}) + "\n")
    os.replace(tmp, path)
    return path
