"""The tiny code model and its data: a character-level Llama SFT'd to write the tiny code task's programs.

Built by the same code as the Countdown model (``services/common/tiny.py``: char tokenizer, SFT,
content-addressed folder) from a :class:`CodeTinySpec`. Its problems are the pipelines of
``services/common/data/tinycode.py``; SFT sees ``n_train_problems`` of them with their reference
programs, and is stopped early enough that the model still gets most of the held-out ones wrong (base
Pass@1 inside [0.05, 0.5]), which leaves RL something to learn.

Like a base LM, it also has a habit that RL has to fix: a fraction ``habit_fraction`` of its SFT programs
read the numbers as strings (``x=input().split()``) and so fail most tests. The habit is decided in the
first characters of the response, the same for every problem, so the signal RL needs is dense and
general (as the Countdown model's format habit, ``services/common/tiny.py``); the rest of the gain is
getting the steps right.

The RL training set, the validation set (for choosing hyper-parameters) and the held-out set (the one
reported) are generated, disjoint from each other and from SFT, and written as native code-dataset rows
(``data/code-tiny/*.jsonl``), so a run reads them through the same loader as public code data.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from services.common.data.code import CodeProblem, load_code_problems, save_code_problems
from services.common.data.tinycode import disjoint_splits, solution_of
from services.common.tiny import BUILD_VERSION, ModelSpec

# One token per character: what the prompts and the reference programs use, plus the rest of the
# letters. Order is part of the vocabulary, so never reorder.
CODE_ALPHABET = string.digits + string.ascii_lowercase + " \n()[]=+-*/%<>,.:_"
DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "code-tiny"
SPLIT_FILES = {"train": "train.jsonl", "val": "val.jsonl", "heldout": "heldout.jsonl"}


@dataclass(frozen=True)
class CodeTinySpec(ModelSpec):
    """Everything that determines the tiny code model and its data; its hash names the model folder."""

    kind: ClassVar[str] = "code"
    alphabet: ClassVar[str] = CODE_ALPHABET

    max_position_embeddings: int = 256
    """Prompt + program stay under ~170 characters."""
    train_steps: int = 300
    n_train_problems: int = 4000
    habit_fraction: float = 0.5
    """Share of SFT programs that read the numbers as strings (the habit RL removes)."""
    min_steps: int = 1
    max_steps: int = 3
    sft_seed: int = 11
    rl_train_seed: int = 12
    val_seed: int = 13
    heldout_seed: int = 14
    rl_train_size: int = 2000
    val_size: int = 256
    heldout_size: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        seeds = (self.sft_seed, self.rl_train_seed, self.val_seed, self.heldout_seed)
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"the SFT, RL, validation and held-out seeds must differ, got {seeds}")
        if not 0.0 <= self.habit_fraction < 1.0:
            raise ValueError(f"habit_fraction must be in [0, 1), got {self.habit_fraction}")

    def spec_hash(self) -> str:
        blob = json.dumps({"build_version": BUILD_VERSION, "kind": self.kind, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def splits(self) -> dict[str, list[tuple[tuple[str, ...], str, CodeProblem]]]:
        """SFT, RL train, validation and held-out problems, pairwise disjoint (SFT first, so the others
        exclude what the model was fine-tuned on)."""
        sizes = {
            "sft": self.n_train_problems,
            "train": self.rl_train_size,
            "val": self.val_size,
            "heldout": self.heldout_size,
        }
        seeds = {
            "sft": self.sft_seed,
            "train": self.rl_train_seed,
            "val": self.val_seed,
            "heldout": self.heldout_seed,
        }
        return disjoint_splits(sizes, seeds, min_steps=self.min_steps, max_steps=self.max_steps)

    def sft_examples(self) -> list[tuple[str, str]]:
        rng = random.Random(self.seed * 31 + 7)
        return [
            (p.prompt, solution_of(steps, final, habit=rng.random() < self.habit_fraction))
            for steps, final, p in self.splits()["sft"]
        ]


def write_data(spec: CodeTinySpec = CodeTinySpec(), out_dir: Path = DATA_DIR) -> dict[str, Path]:
    """Write the RL train, validation and held-out splits as JSON Lines rows (and the spec hash that made
    them); returns the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = spec.splits()
    files = {}
    for name, file in SPLIT_FILES.items():
        save_code_problems([p for _, _, p in splits[name]], out_dir / file)
        files[name] = out_dir / file
    meta = {"spec_hash": spec.spec_hash(), "spec": asdict(spec)}
    (out_dir / "spec.json").write_text(json.dumps(meta) + "\n")
    return files


def data_is_current(spec: CodeTinySpec = CodeTinySpec(), out_dir: Path = DATA_DIR) -> bool:
    try:
        saved = json.loads((out_dir / "spec.json").read_text())
    except (OSError, ValueError):
        return False
    files = (out_dir / f for f in SPLIT_FILES.values())
    return saved.get("spec_hash") == spec.spec_hash() and all(f.is_file() for f in files)


def heldout_problems(n: int, split: str = "heldout") -> list[CodeProblem]:
    """The first ``n`` problems of a shipped split (``heldout`` or ``val``)."""
    return load_code_problems(DATA_DIR / SPLIT_FILES[split])[:n]
