"""Countdown data: the seeded generator's invariants and the Countdown-Tasks loader / saver."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.data.countdown import (
    CountdownProblem,
    DatasetError,
    generate_problems,
    load_countdown_tasks,
    save_countdown_tasks,
)

SEEDS = st.integers(min_value=0, max_value=2**32 - 1)

# --- generator -----------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(seed=SEEDS)
def test_generator_is_deterministic_in_its_seed(seed: int) -> None:
    assert generate_problems(20, seed) == generate_problems(20, seed)


@settings(max_examples=50, deadline=None)
@given(seed=SEEDS)
def test_generator_yields_three_to_four_numbers_and_targets_in_range(seed: int) -> None:
    for p in generate_problems(20, seed):
        assert 3 <= len(p.nums) <= 4
        assert all(1 <= n <= 20 for n in p.nums)
        assert 1 <= p.target <= 100
        assert p.solution


def test_different_seeds_give_different_problems() -> None:
    # Guards against a generator that ignores its seed (which the determinism test cannot catch).
    assert generate_problems(20, 0) != generate_problems(20, 1)


# --- load / save round trip ------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path: Path) -> None:
    problems = generate_problems(50, seed=7)
    path = save_countdown_tasks(problems, tmp_path / "held_out" / "countdown.jsonl")
    assert path.exists()
    assert load_countdown_tasks(path) == problems


def test_loads_public_format_ignoring_extra_fields(tmp_path: Path) -> None:
    # The public Countdown-Tasks rows: nums + target, no solution; blank lines are skipped.
    path = tmp_path / "tasks.json"
    path.write_text(
        '{"target": 98, "nums": [44, 19, 35], "prompt": "ignored"}\n'
        "\n"
        '{"nums": [1, 2, 3, 4], "target": 10.0, "split": "train"}\n'  # an integral float target is fine
    )
    assert load_countdown_tasks(path) == [
        CountdownProblem(nums=(44, 19, 35), target=98),
        CountdownProblem(nums=(1, 2, 3, 4), target=10),
    ]


def test_save_refuses_non_jsonl_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="JSON Lines"):
        save_countdown_tasks(generate_problems(1, seed=0), tmp_path / "tasks.parquet")


# pyarrow is a pinned dependency (requirements/cpu.in): imported inside the tests so that its absence
# fails these loudly instead of skipping them, without hiding the JSONL tests.


def test_parquet_round_trip(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    problems = generate_problems(700, seed=3)
    table = pa.table(
        {
            "target": [p.target for p in problems],
            "nums": [list(p.nums) for p in problems],
            "solution": [p.solution for p in problems],
            "prompt": ["ignored"] * len(problems),  # extra column, ignored
        }
    )
    path = tmp_path / "tasks.parquet"
    pq.write_table(table, path, row_group_size=256)  # several batches: row numbers must run across them
    assert load_countdown_tasks(path) == problems


def test_parquet_public_format_and_bad_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # The public Countdown-Tasks schema: target int64, nums list<int64>, no solution column.
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"target": [98], "nums": [[44, 19, 35]]}), good)
    assert load_countdown_tasks(good) == [CountdownProblem(nums=(44, 19, 35), target=98)]

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"target": [98, 5, None], "nums": [[44, 19, 35], [1, 2], [1, 2]]}), bad)
    with pytest.raises(DatasetError, match="row 3: field 'target' must be an integer, got None"):
        load_countdown_tasks(bad)

    no_nums = tmp_path / "no_nums.parquet"
    pq.write_table(pa.table({"target": [98]}), no_nums)
    with pytest.raises(DatasetError, match="row 1: field 'nums' is missing"):
        load_countdown_tasks(no_nums)


def test_parquet_without_pyarrow_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import pyarrow.parquet` raise ImportError, installed or not.
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "tasks.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_countdown_tasks(path)


# --- bad files and rows ------------------------------------------------------------------------------

GOOD_ROW = '{"nums": [1, 2, 3], "target": 6}'


@pytest.mark.parametrize(
    ("bad_line", "field", "shown"),
    [
        ('{"target": 6}', "'nums'", "missing"),
        ('{"nums": [1, 2, 3]}', "'target'", "missing"),
        ('{"nums": "abc", "target": 6}', "'nums'", "'abc'"),
        ('{"nums": [1], "target": 6}', "'nums'", "[1]"),  # too few
        ('{"nums": [1, 2, 3, 4, 5, 6, 7], "target": 6}', "'nums'", "[1, 2, 3, 4, 5, 6, 7]"),  # too many
        ('{"nums": [1, -2], "target": 6}', "'nums'", "[1, -2]"),
        ('{"nums": [true, 2], "target": 6}', "'nums'", "[True, 2]"),  # bool is not an int here
        ('{"nums": [1.5, 2], "target": 6}', "'nums'", "[1.5, 2]"),
        ('{"nums": [1, 2], "target": true}', "'target'", "True"),
        ('{"nums": [1, 2], "target": 6.5}', "'target'", "6.5"),
        ('{"nums": [1, 2], "target": "6"}', "'target'", "'6'"),
        ('{"nums": [1, 2], "target": NaN}', "'target'", "nan"),
        ('{"nums": [1, 2], "target": 3, "solution": 5}', "'solution'", "5"),
    ],
)
def test_bad_row_names_row_field_and_value(tmp_path: Path, bad_line: str, field: str, shown: str) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_text(f"{GOOD_ROW}\n{bad_line}\n{GOOD_ROW}\n")
    with pytest.raises(DatasetError) as info:
        load_countdown_tasks(path)
    message = str(info.value)
    assert str(path) in message
    assert "row 2:" in message
    assert f"field {field}" in message
    assert shown in message


def test_malformed_json_line_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_text(f"{GOOD_ROW}\n{GOOD_ROW}\n{{nums: [1, 2], target: 3}}\n")
    with pytest.raises(DatasetError, match="row 3: malformed JSON"):
        load_countdown_tasks(path)


def test_row_that_is_not_an_object_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps([1, 2, 3]) + "\n")
    with pytest.raises(DatasetError, match="row 1: expected an object"):
        load_countdown_tasks(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match="no rows"):
        load_countdown_tasks(path)


def test_unknown_suffix_lists_the_formats(tmp_path: Path) -> None:
    path = tmp_path / "tasks.csv"
    path.write_text("nums,target\n")
    with pytest.raises(DatasetError, match=r"unknown dataset format '\.csv'.*\.parquet"):
        load_countdown_tasks(path)


def test_dataset_error_is_a_value_error() -> None:
    assert issubclass(DatasetError, ValueError)
