"""Code problems from the row formats of public code-RL sets (native, PRIME/Eurus and verl ground truth,
APPS/TACO), in JSON Lines and Parquet, and the errors for bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.data.code import CodeProblem, load_code_problems, parse_code_row, save_code_problems
from services.common.data.rows import DatasetError

W = "f.jsonl: row 3"


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_native_rows_keep_stdin_and_assert_tests_and_limits() -> None:
    row = {
        "prompt": "Add two numbers.",
        "tests": [{"stdin": "1 2\n", "expected_stdout": "3\n"}, {"assert": "assert add(1, 2) == 3"}],
        "limits": {"wall_s": 2, "memory_mb": 128},
    }
    p = parse_code_row(row, W)
    assert p.prompt == "Add two numbers." and p.limits == {"wall_s": 2.0, "memory_mb": 128.0}
    assert p.reference() == {
        "language": "python",
        "tests": row["tests"],
        "limits": {"wall_s": 2.0, "memory_mb": 128.0},
    }


def test_prime_ground_truth_json_string_becomes_stdin_tests() -> None:
    truth = json.dumps({"inputs": ["1 2\n", ["3", "4"]], "outputs": ["3\n", "7\n"]})
    p = parse_code_row({"question": "Sum.", "ground_truth": truth}, W)
    # A list of lines is joined with newlines (and ends with one).
    assert p.tests == (
        {"stdin": "1 2\n", "expected_stdout": "3\n"},
        {"stdin": "3\n4\n", "expected_stdout": "7\n"},
    )


def test_verl_rows_read_chat_prompts_and_reward_model_ground_truth() -> None:
    row = {
        "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Print 5."}],
        "reward_model": {"style": "rule", "ground_truth": {"inputs": [""], "outputs": ["5\n"]}},
        "data_source": "codecontests",
    }
    p = parse_code_row(row, W)
    assert p.prompt == "Print 5." and p.tests == ({"stdin": "", "expected_stdout": "5\n"},)


def test_taco_call_based_rows_become_asserts_that_call_the_function() -> None:
    io = {"fn_name": "add", "inputs": [[1, 2], [5, -1]], "outputs": [[3], [4]]}
    p = parse_code_row({"question": "Write add(a, b).", "input_output": json.dumps(io)}, W)
    assert len(p.tests) == 2 and all(set(t) == {"assert"} for t in p.tests)
    # The statements pass for a right program and fail for a wrong one, function or Solution method.
    programs = [
        ("def add(a, b):\n    return a + b\n", True),
        ("def add(a, b):\n    return a - b\n", False),
        ("class Solution:\n    def add(self, a, b):\n        return a + b\n", True),
    ]
    for program, ok in programs:
        for t in p.tests:
            scope: dict = {}
            exec(program, scope)  # noqa: S102 - the test's own program, as the sandboxed harness runs it
            if ok:
                exec(t["assert"], scope)  # noqa: S102
            else:
                with pytest.raises(AssertionError):
                    exec(t["assert"], scope)  # noqa: S102


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "x"}, "no tests; add 'tests', 'ground_truth'"),
        ({"prompt": "x", "tests": []}, "test list is empty"),
        ({"tests": [{"assert": "assert 1"}]}, "no prompt; add one of the fields"),
        ({"prompt": "", "tests": [{"assert": "assert 1"}]}, "field 'prompt' must be a non-empty string"),
        ({"prompt": "x", "tests": [{"stdin": "1"}]}, "field 'tests' item 0 must be"),
        ({"prompt": "x", "tests": "assert 1"}, "field 'tests' must be a list"),
        ({"prompt": "x", "ground_truth": "{not json"}, "field 'ground_truth' is not valid JSON"),
        ({"prompt": "x", "ground_truth": {"inputs": ["1"]}}, "needs 'inputs' and 'outputs' lists"),
        ({"prompt": "x", "input_output": {"inputs": ["1", "2"], "outputs": ["1"]}}, "2 inputs but 1 outputs"),
        ({"prompt": "x", "input_output": {"inputs": [], "outputs": []}}, "test list is empty"),
        (
            {"prompt": "x", "ground_truth": {"inputs": [1], "outputs": ["1"]}},
            "must be a string or a list of lines",
        ),
        (
            {"prompt": "x", "ground_truth": {"fn_name": "1f", "inputs": [[1]], "outputs": [1]}},
            "fn_name must be",
        ),
        ({"prompt": "x", "tests": [{"assert": "assert 1"}], "limits": {"cpu": 1}}, "field 'limits'"),
        (
            {"prompt": "x", "tests": [{"assert": "assert 1"}], "limits": {"wall_s": 0}},
            "limits.wall_s must be",
        ),
        (["prompt"], "expected an object"),
    ],
)
def test_bad_rows_name_the_row_and_the_field(row: object, message: str) -> None:
    with pytest.raises(DatasetError, match=message) as info:
        parse_code_row(row, W)
    assert str(info.value).startswith(W)


def test_jsonl_round_trip_and_row_numbers(tmp_path: Path) -> None:
    problems = [CodeProblem(f"p{i}", ({"stdin": f"{i}\n", "expected_stdout": f"{i}\n"},)) for i in range(3)]
    save_code_problems(problems, tmp_path / "c.jsonl")
    assert load_code_problems(tmp_path / "c.jsonl") == problems
    bad = _write(
        tmp_path / "bad.jsonl", [{"prompt": "a", "tests": [{"assert": "assert 1"}]}, {"prompt": "b"}]
    )
    with pytest.raises(DatasetError, match=r"bad.jsonl: row 2: no tests"):
        load_code_problems(bad)


def test_parquet_rows_in_the_verl_layout(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    truth = json.dumps({"inputs": ["2\n"], "outputs": ["4\n"]})
    table = pa.table({
        "prompt": [[{"role": "user", "content": "Double it."}]],
        "reward_model": [{"ground_truth": truth, "style": "rule"}],
        "extra": [1],
    })  # fmt: skip
    pq.write_table(table, tmp_path / "c.parquet")
    (p,) = load_code_problems(tmp_path / "c.parquet")
    assert p.prompt == "Double it." and p.tests == ({"stdin": "2\n", "expected_stdout": "4\n"},)


def test_a_code_run_config_loads_its_problems_as_tasks(tmp_path: Path) -> None:
    from services.common.config import build_config
    from services.coordinator.tasks import eval_sets, training_problems

    problems = [CodeProblem(f"Print {i}.", ({"stdin": "", "expected_stdout": f"{i}\n"},)) for i in range(6)]
    save_code_problems(problems, tmp_path / "c.jsonl")
    path = tmp_path / "c.jsonl"
    overrides = ["data.task=code", f"data.train_path={path}", f"data.eval_path={path}", "model.path=/m"]
    cfg = build_config({}, [*overrides, "coordinator.eval_problems=2"])
    (held,) = eval_sets(cfg)
    assert [p.prompt for p in held.problems] == ["Print 0.", "Print 1."]
    assert held.problems[0].reference == {
        "language": "python",
        "tests": [{"stdin": "", "expected_stdout": "0\n"}],
    }
    assert [p.prompt for p in training_problems(cfg, exclude=held.problems)] == [
        f"Print {i}." for i in range(2, 6)
    ]


def test_row_filter_keeps_the_code_split_of_a_mixed_file(tmp_path: Path) -> None:
    # PRIME's Eurus-2-RL-Data mixes math rows (a bare answer as ground truth) and coding rows in one file:
    # data.row_filter reads only the coding rows, and errors still name the file's own row numbers.
    import pyarrow as pa
    import pyarrow.parquet as pq

    from services.common.config import build_config
    from services.coordinator.tasks import load_problems

    truth = json.dumps({"inputs": ["2\n"], "outputs": ["4\n"]})
    table = pa.table({
        "prompt": [[{"role": "user", "content": c}] for c in ("1+1?", "Double it.", "2+2?", "Triple it.")],
        "ability": ["math", "coding", "math", "coding"],
        "reward_model": [{"ground_truth": g, "style": "rule"} for g in ("2", truth, "4", "not json")],
    })  # fmt: skip
    pq.write_table(table, tmp_path / "mixed.parquet")
    with pytest.raises(DatasetError, match=r"mixed.parquet: row 1: field 'reward_model.ground_truth'"):
        load_code_problems(tmp_path / "mixed.parquet")  # unfiltered, the first math row is refused
    with pytest.raises(DatasetError, match=r"mixed.parquet: row 4: field 'reward_model.ground_truth'"):
        load_code_problems(tmp_path / "mixed.parquet", {"ability": "coding"})
    _write(tmp_path / "m.jsonl", [{"ability": "math", "prompt": "x", "tests": [{"assert": "assert 1"}]}])
    with pytest.raises(DatasetError, match=r"no rows matching data.row_filter \{'ability': 'coding'\}"):
        load_code_problems(tmp_path / "m.jsonl", {"ability": "coding"})
    table = table.slice(0, 2)
    pq.write_table(table, tmp_path / "ok.parquet")
    path = tmp_path / "ok.parquet"
    overrides = ["data.task=code", f"data.train_path={path}", f"data.eval_path={path}", "model.path=/m"]
    cfg = build_config({}, [*overrides, "data.row_filter={ability: coding}"])
    assert [p.prompt for p in load_problems(cfg, str(path))] == ["Double it."]
