"""Generated code problems that a character-level model can learn: the tiny code task.

A problem is a short pipeline over a list of integers read from stdin, written in a compact notation,
for example ``do: sq >4 odd sum``: square each number, keep those above 4, keep the odd ones, print the
sum. The program that solves it reads the list, applies one Python line per step and prints the result::

    x=list(map(int,input().split()))
    x=[v*v for v in x]
    x=[v for v in x if v>4]
    x=[v for v in x if v%2]
    print(sum(x))

Each problem has ``TESTS_PER_PROBLEM`` stdin/stdout tests on random lists, so a program that gets a
step wrong can still pass the tests that step does not change (a ``>4`` filter is a no-op on a list
whose numbers all exceed 4): the reward, the fraction of tests passed, is graded as for real code data.
Expected outputs are computed here by an independent interpreter of the notation, never by running the
solution, and a unit test checks the two agree. Problems are a deterministic, prefix-stable function of
``(n, seed)``; splits with different seeds are made disjoint by ``disjoint_splits``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from services.common.data.code import CodeProblem

TESTS_PER_PROBLEM = 5
READ_LINE = "x=list(map(int,input().split()))"
# The tiny model's bad habit (``CodeTinySpec.habit_fraction`` of its SFT programs): reading the numbers as
# strings. Such a program crashes on arithmetic or compares text, so it fails most tests.
HABIT_READ_LINE = "x=input().split()"

# step name -> (the Python line of the solution, what it does to the list). Constants 1..9 are drawn per
# problem for the parameterised steps ("+k", "-k", ">k", "<k").
_MAPS: dict[str, tuple[str, Callable[[int, int], int]]] = {
    "sq": ("v*v", lambda v, k: v * v),
    "dbl": ("v*2", lambda v, k: v * 2),
    "+": ("v+{k}", lambda v, k: v + k),
    "-": ("v-{k}", lambda v, k: v - k),
}
_FILTERS: dict[str, tuple[str, Callable[[int, int], bool]]] = {
    "even": ("v%2==0", lambda v, k: v % 2 == 0),
    "odd": ("v%2", lambda v, k: v % 2 == 1),
    ">": ("v>{k}", lambda v, k: v > k),
    "<": ("v<{k}", lambda v, k: v < k),
}
_REORDERS: dict[str, tuple[str, Callable[[list[int]], list[int]]]] = {
    "sort": ("x=sorted(x)", sorted),
    "rev": ("x=x[::-1]", lambda x: x[::-1]),
}
_FINALS: dict[str, tuple[str, Callable[[list[int]], str]]] = {
    "sum": ("print(sum(x))", lambda x: str(sum(x))),
    "len": ("print(len(x))", lambda x: str(len(x))),
    "max": ("print(max(x,default=0))", lambda x: str(max(x, default=0))),
    "min": ("print(min(x,default=0))", lambda x: str(min(x, default=0))),
    "all": ("print(*x)", lambda x: " ".join(map(str, x))),
}
_PARAMETERISED = ("+", "-", ">", "<")
STEP_NAMES = (*_MAPS, *_FILTERS, *_REORDERS)


def _parse(step: str) -> tuple[str, int]:
    if step[:1] in _PARAMETERISED and step[1:].isdigit():
        return step[0], int(step[1:])
    return step, 0


def step_line(step: str) -> str:
    """The solution's Python line for one step of the notation."""
    name, k = _parse(step)
    if name in _MAPS:
        return f"x=[{_MAPS[name][0].format(k=k)} for v in x]"
    if name in _FILTERS:
        return f"x=[v for v in x if {_FILTERS[name][0].format(k=k)}]"
    if name in _REORDERS:
        return _REORDERS[name][0]
    raise ValueError(f"unknown step {step!r}; steps are {STEP_NAMES} (+, -, >, < take a digit 1-9)")


def run_pipeline(steps: Sequence[str], final: str, xs: Sequence[int]) -> str:
    """The expected stdout (without the newline) of the pipeline on ``xs``, by direct interpretation."""
    x = list(xs)
    for step in steps:
        name, k = _parse(step)
        if name in _MAPS:
            x = [_MAPS[name][1](v, k) for v in x]
        elif name in _FILTERS:
            x = [v for v in x if _FILTERS[name][1](v, k)]
        else:
            x = _REORDERS[name][1](x)
    return _FINALS[final][1](x)


def prompt_of(steps: Sequence[str], final: str) -> str:
    return "do: " + " ".join([*steps, final]) + "\n"


def solution_of(steps: Sequence[str], final: str, *, habit: bool = False) -> str:
    """The reference program (what SFT teaches), newline-terminated; ``habit``: with the bad read line."""
    read = HABIT_READ_LINE if habit else READ_LINE
    return "\n".join([read, *(step_line(s) for s in steps), _FINALS[final][0]]) + "\n"


def _draw_step(rng: random.Random) -> str:
    name = rng.choice(STEP_NAMES)
    return f"{name}{rng.randint(1, 9)}" if name in _PARAMETERISED else name


def generate(
    n: int, seed: int, *, min_steps: int = 1, max_steps: int = 3, max_value: int = 20, max_len: int = 6
) -> list[tuple[tuple[str, ...], str, CodeProblem]]:
    """``n`` problems as ``(steps, final, problem)``, drawn in order from ``random.Random(seed)`` (the
    first ``m`` of ``n`` are the ``m`` problems), possibly repeating; tests are lists of 1..``max_len``
    integers in 0..``max_value``."""
    if not 0 <= min_steps <= max_steps:
        raise ValueError(f"need 0 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        steps = tuple(_draw_step(rng) for _ in range(rng.randint(min_steps, max_steps)))
        final = rng.choice(tuple(_FINALS))
        tests = []
        for _ in range(TESTS_PER_PROBLEM):
            xs = [rng.randint(0, max_value) for _ in range(rng.randint(1, max_len))]
            stdin = " ".join(map(str, xs)) + "\n"
            tests.append({"stdin": stdin, "expected_stdout": run_pipeline(steps, final, xs) + "\n"})
        out.append((steps, final, CodeProblem(prompt_of(steps, final), tuple(tests))))
    return out


def disjoint_splits(
    sizes: dict[str, int], seeds: dict[str, int], **kwargs: int
) -> dict[str, list[tuple[tuple[str, ...], str, CodeProblem]]]:
    """Splits of the given sizes, in the given order, each drawn from its own seed and holding no prompt of
    an earlier split nor a repeat of its own (so held-out problems are unseen by SFT and by RL)."""
    seen: set[str] = set()
    out = {}
    for name, size in sizes.items():
        kept: list[tuple[tuple[str, ...], str, CodeProblem]] = []
        total = 4 * size + 64
        while len(kept) < size:
            if total > 400 * size + 10_000:
                raise ValueError(f"split {name!r}: {len(kept)} of {size} unseen problems; widen the space")
            kept = []
            local = set(seen)
            for item in generate(total, seeds[name], **kwargs):
                if item[2].prompt not in local and len(kept) < size:
                    local.add(item[2].prompt)
                    kept.append(item)
            total *= 2
        seen |= {p.prompt for _, _, p in kept}
        out[name] = kept
    return out
