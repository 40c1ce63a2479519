"""MATH-style problems: a statement and a gold answer, scored by the verifier's ``math`` rule (math-verify
on the response's ``\\boxed{}``).

Rows (JSON Lines or Parquet, local or ``hf://datasets/...``) need ``problem`` and either ``answer`` (the
gold answer) or ``solution`` (a worked solution whose last ``\\boxed{...}`` is the gold answer), as in the
Hendrycks MATH releases and their MATH-500 / lighteval copies.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.common.data.rows import DatasetError, read_rows, resolve_data_path, short
from services.common.data.rows import matching as _matching


@dataclass(frozen=True, slots=True)
class MathProblem:
    """One problem; ``answer`` is the gold answer (LaTeX or plain)."""

    problem: str
    answer: str

    def __post_init__(self) -> None:
        if not self.problem.strip() or not self.answer.strip():
            raise ValueError(f"a math problem needs a statement and an answer, got {self!r}")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced; None
    when there is none or it is unclosed."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
        i += 1
    return None


def _parse_row(row: Any, where: str) -> MathProblem:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected an object with 'problem' and 'answer', got {short(row)}")
    name = "problem" if "problem" in row or "question" not in row else "question"  # Minerva names it so
    problem = row.get(name)
    if not isinstance(problem, str) or not problem.strip():
        raise DatasetError(f"{where}: field {name!r} must be a non-empty string, got {short(problem)}")
    answer = row.get("answer")
    if answer is None and isinstance(row.get("solution"), str):
        answer = last_boxed(row["solution"])
        if answer is None:
            raise DatasetError(
                f"{where}: no 'answer' field and the 'solution' has no \\boxed{{...}} answer; add an 'answer'"
            )
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise DatasetError(
            f"{where}: field 'answer' must be a non-empty string or number (or give a 'solution' with "
            f"\\boxed{{...}}), got {short(answer)}"
        )
    return MathProblem(problem=problem, answer=answer.strip())


def load_math_problems(
    path: str | os.PathLike[str], where: Mapping[str, Any] | None = None
) -> list[MathProblem]:
    """Problems from a MATH-style file; ``DatasetError`` names the file, row and field of a bad row."""
    path = resolve_data_path(path)
    example = '{"problem": "What is 1 + 1?", "answer": "2"}'
    rows = read_rows(path, (), ("problem", "question", "answer", "solution"), example=example, where=where)
    problems = [_parse_row(row, f"{path}: row {n}") for n, row in rows]
    if not problems:
        raise DatasetError(
            f"{path}: no rows{_matching(where)}; expected at least one with 'problem' and 'answer'"
        )
    return problems
