"""A problem as the pipeline sees it, whatever the task: prompt text, the verifier rule's reference, and a
key that identifies it (to keep held-out problems out of the RL set). Prompt templates live here.

Templates (``data.prompt_template``): ``plain`` is the short prompt (the tiny character-level model's for
Countdown; the problem plus the ``\\boxed{}`` instruction for math); ``r1`` is the R1-Zero conversation
prompt for base models used by the public Countdown / MATH RL recipes, which ends inside ``<think>`` so the
model reasons first.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

from services.common.data.code import CodeProblem
from services.common.data.countdown import CountdownProblem, format_prompt
from services.common.data.math import MathProblem

Template = Literal["plain", "r1"]

R1_PREAMBLE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer."
)
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True, slots=True)
class Problem:
    """``prompt`` is the text the engine continues; ``reference`` is what the task's verifier rule needs
    (countdown: ``nums``, ``target``; math: ``answer``); ``key`` is equal for the same problem."""

    prompt: str
    reference: dict[str, Any] = field(hash=False)
    key: Hashable


def countdown_problem(p: CountdownProblem, template: Template = "plain") -> Problem:
    if template == "plain":
        prompt = format_prompt(p.nums, p.target)
    else:
        question = (
            f"Using the numbers {list(p.nums)}, create an equation that equals {p.target}. You can use basic "
            "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work in "
            "<think> </think> tags. And return the final answer in <answer> </answer> tags, for example "
            "<answer> (1 + 2) / 3 </answer>."
        )
        prompt = f"{R1_PREAMBLE}\nUser: {question}\nAssistant: Let me solve this step by step.\n<think>"
    reference = {"nums": list(p.nums), "target": p.target}
    return Problem(prompt, reference, ("countdown", tuple(sorted(p.nums)), p.target))


def math_problem(p: MathProblem, template: Template = "plain") -> Problem:
    if template == "plain":
        prompt = f"{p.problem}\n{MATH_INSTRUCTION}\n"
    else:
        prompt = f"{R1_PREAMBLE}\nUser: {p.problem}\n{MATH_INSTRUCTION}\nAssistant: <think>"
    return Problem(prompt, {"answer": p.answer}, ("math", " ".join(p.problem.split())))


def code_problem(p: CodeProblem, template: Template = "plain") -> Problem:
    """``plain``: the statement as given; ``r1``: inside the R1-Zero conversation, asking for one fenced
    Python program (the ``code`` rule scores the last fenced block)."""
    if template == "plain":
        prompt = p.prompt
    else:
        ask = "Write a complete Python 3 program in one ```python code block."
        prompt = f"{R1_PREAMBLE}\nUser: {p.prompt}\n{ask}\nAssistant: <think>"
    return Problem(prompt, p.reference(), ("code", " ".join(p.prompt.split())))
