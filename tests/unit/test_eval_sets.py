"""Named evaluation sets: their config, how generated sets are drawn, and the Pass@k summary of scored
groups (the coordinator's part of an evaluation)."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.config import ConfigError, build_config
from services.common.fanout import split
from services.common.messages import ResponseGroup, Rollout
from services.coordinator.evaluation import EvalSet, eval_tasks, headline, pass_at_k, reported_ks, summarize
from services.coordinator.tasks import eval_sets, rl_exclusions, training_problems

SETS = [
    "data.eval_sets=[{name: cd34, nums: [3, 4], problems: 24}, {name: cd4, nums: [4], problems: 16},"
    " {name: val, problems: 20, samples: 4, report: false}]"
]


def test_reported_ks_are_1_8_the_largest_power_of_two_and_eval_k() -> None:
    assert reported_ks(16) == (1, 8, 16)
    assert reported_ks(12, extra=4) == (1, 4, 8)
    assert reported_ks(4) == (1, 4)
    assert reported_ks(1) == (1,)
    assert reported_ks(100, extra=8) == (1, 8, 64)


def test_generated_sets_are_disjoint_filtered_and_kept_out_of_training() -> None:
    cfg = build_config({}, SETS)
    sets = eval_sets(cfg)
    assert [(s.name, len(s.problems), s.samples, s.report) for s in sets] == [
        ("cd34", 24, 8, True),
        ("cd4", 16, 8, True),
        ("val", 20, 4, False),
    ]
    counts = {s.name: {len(p.reference["nums"]) for p in s.problems} for s in sets}
    assert counts["cd34"] <= {3, 4} and counts["cd4"] == {4}
    keys = [p.key for s in sets for p in s.problems]
    assert len(keys) == len(set(keys)) == 60  # no problem in two sets
    # Sets with the same filter are random parts of one sample: the validation set has the test set's mix
    # of 2-, 3- and 4-number problems (not what a filtered set left over).
    both = build_config({}, ["data.eval_sets=[{name: test, problems: 300}, {name: val, problems: 300}]"])
    mix = {s.name: [sum(len(p.reference["nums"]) == k for p in s.problems) / 300 for k in (2, 3, 4)]
           for s in eval_sets(both)}  # fmt: skip
    assert all(abs(a - b) < 0.08 for a, b in zip(mix["test"], mix["val"], strict=True)), mix
    assert min(mix["val"]) > 0.1  # every count of numbers is there
    train = training_problems(cfg, exclude=rl_exclusions(cfg, [p for s in sets for p in s.problems]))
    assert not {p.key for p in train} & set(keys)
    assert [p.key for p in eval_sets(cfg)[1].problems] == [p.key for p in sets[1].problems]  # deterministic


def test_default_is_one_heldout_set_as_before() -> None:
    from services.common.tiny import heldout_problems

    (only,) = eval_sets(build_config({}, ["coordinator.eval_problems=10"]))
    assert only.name == "heldout" and only.samples == 8
    assert [p.reference["target"] for p in only.problems] == [p.target for p in heldout_problems(10)]


def test_train_pool_keeps_the_first_problems_and_refuses_more_than_exist() -> None:
    cfg = build_config({}, ["data.train_pool=100"])
    assert len(training_problems(cfg)) == 100
    full = training_problems(build_config({}, []))
    assert [p.key for p in training_problems(cfg)] == [p.key for p in full[:100]]
    with pytest.raises(ValueError, match="data.train_pool=99999 but only"):
        training_problems(build_config({}, ["data.train_pool=99999"]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.eval_sets=[{name: a}, {name: a}]", "names must be unique"),
        ("data.eval_sets=[{name: a, evaluate: false}]", "at least one set with evaluate: true"),
        ("data.eval_sets=[{name: a, path: x.jsonl, nums: [4]}]", "nums filters generated problems only"),
        ("data.eval_sets=[{name: a, nums: [7]}]", "nums must lie in 2..6"),
        ("data.eval_sets=[{name: 'a b'}]", "eval_sets.0.name"),
    ],
)
def test_bad_eval_sets_name_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config({}, [override])


def test_eval_path_and_eval_sets_are_exclusive() -> None:
    with pytest.raises(ConfigError, match="exclusive"):
        build_config({}, ["data.eval_path=x.jsonl", "data.eval_sets=[{name: a}]"])


def _group(task, passes: int, n: int) -> ResponseGroup:
    rollouts = tuple(Rollout(np.array([1], np.int32), np.array([-0.5], np.float32), "stop") for _ in range(n))
    verdicts = ("pass",) * passes + ("fail",) * (n - passes)
    rewards = tuple(1.0 if v == "pass" else 0.1 for v in verdicts)
    return ResponseGroup(
        task=task, rollouts=rollouts, behavior_version=0, behavior_sha256="a" * 64
    ).with_rewards(rewards, verdicts)


def test_summarize_is_the_unbiased_estimator_per_problem() -> None:
    cfg = build_config({}, [])
    (s,) = eval_sets(build_config({}, ["coordinator.eval_problems=3"]))
    tasks = eval_tasks(cfg, s, [[1, 2]] * 3, step=5, version=2)
    assert {t.group_size for t in tasks} == {8} and {t.admit_version for t in tasks} == {2}
    assert len({t.sampling_seed(0) for t in tasks}) == 3  # one random stream per problem
    groups = [_group(t, c, 8) for t, c in zip(tasks, (0, 1, 8), strict=True)]
    out = summarize(groups, (1, 8))
    # Pass@1 = mean(c/n) = (0 + 1/8 + 1) / 3; Pass@8 with n = 8: 0, 1, 1.
    assert out["pass_at"]["1"] == pytest.approx((0 + 1 / 8 + 1) / 3)
    assert out["pass_at"]["8"] == pytest.approx(2 / 3)
    assert out["correct"] == [0, 1, 8] and out["n_samples"] == 8
    assert out["mean_reward"] == pytest.approx((8 * 0.1 + (1 + 7 * 0.1) + 8 * 1.0) / 24)
    assert headline({"x": out}, ["x"], 8) == {"eval_set": "x", "pass_at_1": out["pass_at"]["1"],
                                              "pass_at_k": out["pass_at"]["8"], "k": 8}  # fmt: skip
    assert pass_at_k(8, 1, 1) == 1 / 8


def test_eval_seeds_depend_on_set_problem_and_seed_not_on_the_run_name_or_step() -> None:
    cfg = build_config({}, ["coordinator.eval_problems=2", "data.eval_sets=[{name: a}, {name: b}]"])
    set_a, set_b = eval_sets(cfg)

    def seeds(cfg, step, eval_set=set_a):
        return [task.sampling_seed(0) for task in eval_tasks(cfg, eval_set, [[1]] * 2, step, 0)]

    a = build_config({}, ["coordinator.run_name=a"])
    b = build_config({}, ["coordinator.run_name=b"])
    assert seeds(a, 0) == seeds(b, 0)
    # every evaluation of a run draws problem i's samples with the same random numbers (the gain over the
    # step-0 evaluation is paired), but the tasks of two evaluations keep distinct ids
    assert seeds(a, 0) == seeds(a, 10)
    ids = lambda step: {task.task_id for task in eval_tasks(a, set_a, [[1]] * 2, step, 0)}  # noqa: E731
    assert not ids(0) & ids(10)
    assert len(set(seeds(a, 0))) == 2 and set(seeds(a, 0)).isdisjoint(seeds(a, 0, set_b))
    assert seeds(a, 0) != seeds(build_config({}, ["generator.seed=1"]), 0)


def test_eval_set_needs_problems() -> None:
    with pytest.raises(ValueError, match="has no problems"):
        EvalSet("empty", (), 8)


def test_split_keeps_order_and_sizes() -> None:
    assert split(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split([1], 4) == [[1]]
    assert split([], 2) == []
    with pytest.raises(ValueError):
        split([1], 0)


def test_one_sample_per_problem_is_an_evaluation_task() -> None:
    # coordinator.eval_samples may be 1 (expected Pass@1 from one sample); training groups keep K >= 2.
    cfg = build_config({}, ["coordinator.eval_samples=1", "coordinator.eval_k=1"])
    (s,) = eval_sets(cfg)
    (task,) = eval_tasks(cfg, EvalSet(s.name, s.problems[:1], 1), [[1, 2]], step=0, version=0)
    out = summarize([_group(task, 1, 1)], reported_ks(1))
    assert out["pass_at"] == {"1": 1.0} and task.group_size == 1
    with pytest.raises(ConfigError, match="coordinator.group_size"):
        build_config({}, ["coordinator.group_size=1"])
