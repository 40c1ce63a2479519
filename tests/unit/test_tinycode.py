"""The tiny code task: its reference programs agree with the independent interpreter of the notation, its
splits are disjoint, and the shipped data files are exactly what the spec generates."""

from __future__ import annotations

import contextlib
import io
import json
import sys

import pytest

from services.common.data.code import load_code_problems
from services.common.data.tinycode import generate, prompt_of, run_pipeline, solution_of, step_line
from services.common.tiny import TinySpec, build_tokenizer, shipped_model_dir
from services.common.tiny_code import DATA_DIR, SPLIT_FILES, CodeTinySpec, data_is_current, write_data


def _run(program: str, stdin: str) -> str:
    out, saved = io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(program, "<solution>", "exec"), {"__name__": "__main__"})  # noqa: S102 - our own
    finally:
        sys.stdin = saved
    return out.getvalue()


def test_reference_programs_pass_their_own_tests() -> None:
    # The expected outputs come from run_pipeline, never from the programs: running each program on its
    # tests checks the two definitions against each other.
    for steps, final, problem in generate(300, seed=5):
        program = solution_of(steps, final)
        for t in problem.tests:
            assert _run(program, t["stdin"]) == t["expected_stdout"], (problem.prompt, t)


def test_notation_hand_worked() -> None:
    assert prompt_of(("sq", ">4", "odd"), "sum") == "do: sq >4 odd sum\n"
    assert run_pipeline(("sq", ">4", "odd"), "sum", [1, 2, 3, 5]) == str(9 + 25)
    assert run_pipeline(("-3", "sort"), "all", [5, 1]) == "-2 2"
    assert run_pipeline(("even",), "max", [1, 3]) == "0"  # empty list: max default 0
    assert step_line("<7") == "x=[v for v in x if v<7]"
    with pytest.raises(ValueError, match="unknown step 'cube'"):
        step_line("cube")


def test_generation_is_prefix_stable_and_seeded() -> None:
    long, short = generate(50, seed=3), generate(20, seed=3)
    assert [p.prompt for _, _, p in short] == [p.prompt for _, _, p in long[:20]]
    assert [p.tests for _, _, p in short] == [p.tests for _, _, p in long[:20]]
    assert [p.prompt for _, _, p in generate(20, seed=4)] != [p.prompt for _, _, p in short]


def test_splits_are_disjoint_and_the_tokenizer_covers_them() -> None:
    spec = CodeTinySpec(n_train_problems=300, rl_train_size=200, val_size=50, heldout_size=50)
    splits = spec.splits()
    prompts = {name: {p.prompt for _, _, p in items} for name, items in splits.items()}
    assert {name: len(v) for name, v in prompts.items()} == {
        "sft": 300,
        "train": 200,
        "val": 50,
        "heldout": 50,
    }
    names = list(prompts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not prompts[a] & prompts[b], (a, b)
    tokenizer = build_tokenizer(spec.max_position_embeddings, spec.alphabet)
    for prompt, answer in spec.sft_examples():
        ids = tokenizer(prompt + answer)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert len(ids) + 1 <= spec.max_position_embeddings  # + eos


def test_shipped_data_is_what_the_spec_generates(tmp_path) -> None:
    spec = CodeTinySpec()
    assert data_is_current(spec), (
        "data/code-tiny is stale: run python -m services.tools build-tiny --task code"
    )
    write_data(spec, tmp_path)
    for file in SPLIT_FILES.values():
        assert (tmp_path / file).read_bytes() == (DATA_DIR / file).read_bytes(), file
    assert json.loads((tmp_path / "spec.json").read_text())["spec_hash"] == spec.spec_hash()
    heldout = load_code_problems(DATA_DIR / SPLIT_FILES["heldout"])
    assert len(heldout) == spec.heldout_size and all(len(p.tests) == 5 for p in heldout)


def test_model_folders_are_named_by_kind_and_the_countdown_hash_is_unchanged() -> None:
    # The shipped Countdown model's folder name is its spec hash: generalising the build must not move it.
    assert shipped_model_dir(TinySpec()).name == "countdown-tiny-2a37dd7da757"
    assert shipped_model_dir(CodeTinySpec()).name.startswith("code-tiny-")
    with pytest.raises(ValueError, match="seeds must differ"):
        CodeTinySpec(val_seed=11)
