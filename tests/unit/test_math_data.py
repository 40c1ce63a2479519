"""MATH-style data: the loader's rows and errors, the gold answer from a solution's last \\boxed{}, the
prompt templates of both tasks, Hub dataset paths, and the held-out/training split from files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.config import load_config
from services.common.data.countdown import CountdownProblem, format_prompt, save_countdown_tasks
from services.common.data.math import MathProblem, last_boxed, load_math_problems
from services.common.data.problems import countdown_problem, math_problem
from services.common.data.rows import DatasetError, resolve_data_path
from services.coordinator.tasks import eval_sets, training_problems


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_last_boxed_balances_braces_and_takes_the_last() -> None:
    assert last_boxed(r"first \boxed{1}, then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed(r"\fbox{x^{2}}") == "x^{2}"
    assert last_boxed("no box") is None
    assert last_boxed(r"\boxed{unclosed {") is None


def test_loader_takes_answer_or_the_solutions_boxed_answer(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "m.jsonl",
        [
            {"problem": "1+1?", "answer": "2"},
            {"problem": "Half of 1?", "solution": r"It is \boxed{\frac{1}{2}}.", "level": "Level 1"},
            {"problem": "3*4?", "answer": 12},
        ],
    )
    assert load_math_problems(path) == [
        MathProblem("1+1?", "2"),
        MathProblem("Half of 1?", r"\frac{1}{2}"),
        MathProblem("3*4?", "12"),
    ]


def test_loader_reads_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"problem": ["a?", "b?"], "solution": [r"\boxed{1}", r"\boxed{2}"]}), path)
    assert [p.answer for p in load_math_problems(path)] == ["1", "2"]
    # Minerva-style mirrors call the problem `question`
    pq.write_table(pa.table({"question": ["c?"], "answer": ["3"]}), path)
    assert [(p.problem, p.answer) for p in load_math_problems(path)] == [("c?", "3")]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"answer": "2"}, "row 1: field 'problem' must be a non-empty string"),
        ({"question": " ", "answer": "2"}, "row 1: field 'question' must be a non-empty string"),
        ({"problem": "x", "solution": "no box here"}, "row 1: no 'answer' field and the 'solution' has no"),
        ({"problem": "x", "answer": ""}, "row 1: field 'answer' must be a non-empty string"),
        (["not", "an", "object"], "row 1: expected an object with 'problem' and 'answer'"),
    ],
)
def test_loader_names_row_and_field(tmp_path: Path, row: object, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_math_problems(_jsonl(tmp_path / "bad.jsonl", [row]))


def test_loader_refuses_empty_and_unknown_files(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="no rows"):
        load_math_problems(tmp_path / "empty.jsonl")
    with pytest.raises(DatasetError, match=r"unknown dataset format '\.csv'"):
        load_math_problems(tmp_path / "x.csv")


def test_hub_paths_are_parsed_and_bad_ones_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_download(repo: str, filename: str, repo_type: str, revision: str | None) -> str:
        seen.update(repo=repo, filename=filename, repo_type=repo_type, revision=revision)
        return "/cache/file.parquet"

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    path = resolve_data_path("hf://datasets/Jiayi-Pan/Countdown-Tasks-3to4@v1/data/train.parquet")
    assert path == Path("/cache/file.parquet")
    assert seen == {"repo": "Jiayi-Pan/Countdown-Tasks-3to4", "filename": "data/train.parquet",
                    "repo_type": "dataset", "revision": "v1"}  # fmt: skip
    assert resolve_data_path("local/file.jsonl") == Path("local/file.jsonl")
    with pytest.raises(DatasetError, match="hf://datasets/<owner>/<name>"):
        resolve_data_path("hf://models/x")


def test_templates() -> None:
    p = CountdownProblem((3, 5, 7), 22)
    assert countdown_problem(p).prompt == format_prompt((3, 5, 7), 22)  # plain = the tiny model's prompt
    r1 = countdown_problem(p, "r1")
    assert "Using the numbers [3, 5, 7], create an equation that equals 22" in r1.prompt
    assert r1.prompt.endswith("<think>") and r1.reference == {"nums": [3, 5, 7], "target": 22}
    assert r1.key == countdown_problem(CountdownProblem((7, 3, 5), 22)).key  # same numbers, any order
    m = math_problem(MathProblem("What is  1+1?", "2"), "r1")
    assert "\\boxed{}" in m.prompt and m.prompt.endswith("<think>") and m.reference == {"answer": "2"}
    assert m.key == math_problem(MathProblem("What is 1+1?", "2")).key  # whitespace-insensitive


def test_held_out_file_is_evaluated_and_kept_out_of_training(tmp_path: Path) -> None:
    problems = [CountdownProblem((i, i + 1), 2 * i + 1) for i in range(1, 11)]
    path = save_countdown_tasks(problems, tmp_path / "cd.jsonl")
    cfg = load_config(
        None, [f"data.train_path={path}", f"data.eval_path={path}", "coordinator.eval_problems=3"]
    )
    (heldout,) = eval_sets(cfg)
    held = heldout.problems
    assert heldout.name == "heldout"
    assert [p.reference["target"] for p in held] == [3, 5, 7]
    train = training_problems(cfg, exclude=held)
    assert len(train) == 7 and not {p.key for p in train} & {p.key for p in held}
