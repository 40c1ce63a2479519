"""The tiny Countdown base model: a char-level tokenizer and a small Llama, SFT'd for a few minutes.

``build_tiny`` makes, deterministically from a :class:`TinySpec`, a Hugging Face model folder
(safetensors, fp32, tokenizer, generation config) that transformers and vLLM-CPU both load. It is
trained just long enough to get some Countdown problems right (expected Pass@1 well inside
[0.05, 0.5]), which leaves room for RL to show learning.

Like a base LM asked for a tagged answer, it does not always comply: a fraction
``TinySpec.untagged_fraction`` of its SFT answers are the bare expression, without the
``<answer>…</answer>`` tags the scorer requires. Those score 0 however right the arithmetic is, so
the base policy's format habit is the first thing RL has to fix — the early phase of Countdown RL on
base models — and the rest of the gain is sharpening towards the correct expressions. The habit is
decided at the first response token, so the signal RL needs is dense and general, not memorised per
problem.

The folder is content-addressed: its default name carries a hash of the spec, a build goes to a
temp folder that is renamed into place only when complete, and a folder whose ``tiny_spec.json``
matches the spec is reused as is.

The build of the default spec is shipped in ``models/`` (4 MB): SFT is bit-identical only on the same
machine and thread count, so a rebuild elsewhere starts RL from a slightly different base (base Pass@1
0.25-0.27 seen); the shipped one makes every machine start from the same weights and saves CI the
three-minute build. ``python -m services.tools build-tiny --force`` rebuilds into the cache; copy that
folder to ``models/`` to ship it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import string
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from services.common.data.countdown import CountdownProblem, format_answer, format_prompt, generate_problems
from services.common.paths import project_cache_dir, set_cache_env

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# Bump when the build code changes what it produces for the same spec, so stale caches are rebuilt.
BUILD_VERSION = 3
SPEC_FILE = "tiny_spec.json"
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# Every character a prompt or answer can contain, one token each. Letters cover the prompt words and
# the answer tags; the rest is the arithmetic. Order is part of the vocabulary, so never reorder.
ALPHABET = string.digits + "+-*/()=. \n<>" + string.ascii_lowercase + string.ascii_uppercase
# The vLLM CPU attention backend only has kernels for these head sizes (CPUAttentionBackend).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass(frozen=True)
class ModelSpec(ABC):
    """What the build reads from a tiny model's spec (:class:`TinySpec`, the code task's ``CodeTinySpec``):
    the model shape and SFT schedule (these fields, whose defaults are the Countdown model's), the
    character vocabulary (``alphabet``), the folder prefix (``kind``), the hash and the SFT examples."""

    kind: ClassVar[str]
    alphabet: ClassVar[str]

    seed: int = 0
    """Seed of weight init and batch order (``torch.manual_seed``)."""
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    """``hidden_size / num_heads`` must be a head size the vLLM CPU backend supports."""
    intermediate_size: int = 512
    max_position_embeddings: int = 128
    """Prompt + answer must fit; vLLM's ``max_model_len`` may not exceed this."""
    train_steps: int = 500
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 25

    def __post_init__(self) -> None:
        head_dim, rest = divmod(self.hidden_size, self.num_heads)
        if rest or head_dim not in VLLM_CPU_HEAD_SIZES:
            raise ValueError(
                f"hidden_size/num_heads = {self.hidden_size}/{self.num_heads} must be an integer in "
                f"{VLLM_CPU_HEAD_SIZES} (vLLM CPU attention head sizes); pick other sizes"
            )
        if min(self.train_steps, self.batch_size) < 1 or self.lr <= 0:
            raise ValueError(f"train_steps, batch_size and lr must be > 0: {self}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def spec_hash(self) -> str:
        """Short stable hash of the spec (every field, whatever its class) and the build code version."""
        blob = json.dumps({"build_version": BUILD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @abstractmethod
    def sft_examples(self) -> list[tuple[str, str]]:
        """(prompt, answer) per SFT example: each task's spec gives its own."""


@dataclass(frozen=True)
class TinySpec(ModelSpec):
    """Everything that determines the tiny Countdown model; its hash names the cache folder."""

    kind: ClassVar[str] = "countdown"
    alphabet: ClassVar[str] = ALPHABET

    n_train_problems: int = 8000
    """Distinct SFT problems, cycled over ``train_steps * batch_size`` examples. Kept well below the
    problem space: held-out problems must avoid all of them, and the more the training set covers,
    the more the held-out set is left with the rare (few-solution, harder) problems."""
    train_seed: int = 1
    """Seed of the SFT problems; held-out problems use ``heldout_seed`` and exclude these."""
    heldout_seed: int = 2
    untagged_fraction: float = 0.0
    """Share of SFT answers written without the answer tags (the format habit RL removes)."""
    # Difficulty mix: 2-number problems are easy, 3 medium, 4 hard; numbers up to 50 keep the problem
    # space large enough for a disjoint held-out set that is not just the leftover hard cases. Measured
    # with these defaults (256 held-out x 8 samples, T=1): Pass@1 0.19 (2 numbers 0.57, 3 0.11,
    # 4 0.01), Pass@8 0.52, mean reward 0.23. Numbers up to 99 gave 0.42; only 3-4 numbers ~0.05-0.1.
    min_nums: int = 2
    max_nums: int = 4
    max_num: int = 50
    max_target: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_train_problems < 1:
            raise ValueError(f"n_train_problems must be > 0: {self}")
        if not 0.0 <= self.untagged_fraction < 1.0:
            raise ValueError(f"untagged_fraction must be in [0, 1), got {self.untagged_fraction}")
        if self.train_seed == self.heldout_seed:
            raise ValueError(f"train_seed and heldout_seed must differ, both are {self.train_seed}")

    def problem_kwargs(self) -> dict[str, int]:
        return {
            "min_nums": self.min_nums,
            "max_nums": self.max_nums,
            "max_num": self.max_num,
            "max_target": self.max_target,
        }

    def sft_examples(self) -> list[tuple[str, str]]:
        """(prompt, answer) per SFT problem; a seeded ``untagged_fraction`` of the answers is the bare
        expression."""
        import random

        rng = random.Random(self.seed * 31 + 7)
        out = []
        for p in train_problems(self):
            answer = p.solution if rng.random() < self.untagged_fraction else format_answer(p.solution)
            out.append((format_prompt(p.nums, p.target), answer))
        return out


SHIPPED_MODELS = Path(__file__).resolve().parents[2] / "models"


def default_model_dir(spec: ModelSpec = TinySpec()) -> Path:
    """``<project cache>/models/<kind>-tiny-<spec hash>``."""
    return project_cache_dir() / "models" / f"{spec.kind}-tiny-{spec.spec_hash()}"


def shipped_model_dir(spec: ModelSpec = TinySpec()) -> Path:
    """``models/<kind>-tiny-<spec hash>`` in the repository (complete only for a shipped spec)."""
    return SHIPPED_MODELS / f"{spec.kind}-tiny-{spec.spec_hash()}"


def _problem_key(p: CountdownProblem) -> tuple[tuple[int, ...], int]:
    # Order-free: "3 7 12 → 33" and "12 3 7 → 33" are the same problem to a solver.
    return tuple(sorted(p.nums)), p.target


def train_problems(spec: TinySpec = TinySpec()) -> list[CountdownProblem]:
    """The SFT problems: ``n_train_problems`` draws from ``train_seed``."""
    return generate_problems(spec.n_train_problems, spec.train_seed, **spec.problem_kwargs())


def heldout_problems(
    n: int = 256, seed: int | None = None, spec: TinySpec = TinySpec()
) -> list[CountdownProblem]:
    """``n`` evaluation problems, distinct from each other and from every SFT problem of ``spec``.

    ``seed`` defaults to ``spec.heldout_seed``; it must differ from ``spec.train_seed``.
    """
    seed = spec.heldout_seed if seed is None else seed
    if seed == spec.train_seed:
        raise ValueError(f"held-out seed {seed} equals the training seed; pick another")
    seen = {_problem_key(p) for p in train_problems(spec)}
    out: list[CountdownProblem] = []
    # generate_problems is prefix-stable in n, so drawing a longer stream and scanning only its new tail
    # keeps the result a deterministic function of (n, seed, spec); the cap stops a search in a problem
    # space the training set has (nearly) exhausted.
    scanned, total, cap = 0, max(4 * n, 256), 64 * n + 100_000
    while len(out) < n:
        if scanned >= cap:
            raise ValueError(
                f"found only {len(out)} of {n} held-out problems disjoint from training in {scanned} draws; "
                "the problem space is too small: raise max_num / max_nums or lower n_train_problems"
            )
        for p in generate_problems(total, seed, **spec.problem_kwargs())[scanned:]:
            if _problem_key(p) not in seen and len(out) < n:
                seen.add(_problem_key(p))
                out.append(p)
        scanned, total = total, min(2 * total, cap)
    return out


def build_tokenizer(model_max_length: int = 128, alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """A char-level tokenizer over ``alphabet``: one token per character, ``<s>`` prepended.

    A BPE model with no merges over a character vocabulary splits any text into its characters
    (unknown ones become ``<unk>``); the ``Fuse`` decoder joins them back without spaces.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, UNK]
    vocab = {tok: i for i, tok in enumerate(specials + list(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.add_special_tokens(specials)
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        add_bos_token=True,
        add_eos_token=False,
        padding_side="right",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def _model_config(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )


def _encode_examples(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast) -> list[tuple[list[int], int]]:
    """(token ids of ``<s> prompt answer </s>``, number of prompt tokens incl. ``<s>``) per SFT example."""
    out = []
    for prompt, answer in spec.sft_examples():
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        out.append((prompt_ids + answer_ids + [tokenizer.eos_token_id], len(prompt_ids)))
    return out


def _sft(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, spec: ModelSpec) -> None:
    """Teacher-forced SFT on prompt + answer + eos, loss on the answer tokens (and eos) only."""
    import torch

    examples = _encode_examples(spec, tokenizer)
    too_long = max(len(ids) for ids, _ in examples)
    if too_long > spec.max_position_embeddings:
        raise ValueError(f"an SFT example has {too_long} tokens > max_position_embeddings; raise it")
    gen = torch.Generator().manual_seed(spec.seed)
    order: list[int] = []  # one fresh permutation of the problems per epoch
    while len(order) < spec.train_steps * spec.batch_size:
        order += torch.randperm(len(examples), generator=gen).tolist()
    optim = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.01)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10 %
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        frac = (step - spec.warmup_steps) / max(1, spec.train_steps - spec.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_at)
    model.train()
    started = time.perf_counter()
    for step in range(spec.train_steps):
        batch = [examples[i] for i in order[step * spec.batch_size : (step + 1) * spec.batch_size]]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)  # (B, T)
        labels = torch.full((len(batch), width), -100)  # (B, T); -100 = no loss
        attention = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        for row, (ids, n_prompt) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
            attention[row, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        if step % 50 == 0 or step == spec.train_steps - 1:
            logger.info(
                "tiny SFT step %d/%d loss %.4f (%.0fs)",
                step,
                spec.train_steps,
                loss.item(),
                time.perf_counter() - started,
            )
    model.eval()


def is_complete(model_dir: Path, spec: ModelSpec) -> bool:
    """True when ``model_dir`` holds a finished build of exactly ``spec``."""
    try:
        saved = json.loads((model_dir / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return False
    needed = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")
    return saved.get("spec_hash") == spec.spec_hash() and all((model_dir / f).is_file() for f in needed)


def _build_into(tmp: Path, spec: ModelSpec) -> None:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(spec.max_position_embeddings, spec.alphabet)
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(_model_config(spec, tokenizer)).float()
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("tiny model: %d params, head_dim %d", n_params, spec.head_dim)
    started = time.perf_counter()
    # Deterministic kernels; the result is still only bit-identical on the same machine and thread count.
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _sft(model, tokenizer, spec)
    finally:
        torch.use_deterministic_algorithms(previous)
    train_s = time.perf_counter() - started
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    meta = {"spec_hash": spec.spec_hash(), "build_version": BUILD_VERSION, "spec": asdict(spec)}
    meta |= {"n_params": n_params, "head_dim": spec.head_dim, "train_seconds": round(train_s, 1)}
    # Written last: its presence with the right hash is what marks the folder complete.
    (tmp / SPEC_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _remove_stale_temps(out_dir: Path, max_age_s: float = 3 * 3600.0) -> None:
    """Delete temp folders of killed builds of ``out_dir`` (a live build takes minutes, not hours)."""
    now = time.time()
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        if now - stale.stat().st_mtime > max_age_s:
            logger.info("removing stale partial build %s", stale)
            shutil.rmtree(stale, ignore_errors=True)


def build_tiny(out_dir: Path | None = None, spec: ModelSpec = TinySpec(), *, force: bool = False) -> Path:
    """Build (or reuse) the tiny model for ``spec`` and return its folder.

    Without ``out_dir``, the shipped build of ``spec`` (``models/``) if there is one. Reuses ``out_dir``
    when it already holds a complete build of ``spec`` (unless ``force``); else
    builds in a sibling temp folder and renames it into place, so readers never see a partial model.
    """
    set_cache_env()
    if out_dir is None and not force and is_complete(shipped_model_dir(spec), spec):
        return shipped_model_dir(spec)
    out_dir = Path(out_dir) if out_dir is not None else default_model_dir(spec)
    if not force and is_complete(out_dir, spec):
        logger.info("tiny model up to date at %s", out_dir)
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    started = time.perf_counter()
    try:
        _build_into(tmp, spec)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the model is meant to be shared
        if out_dir.exists():
            # A stale or mismatched build (or --force): move it aside before the swap.
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, trash / "model")
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_complete(out_dir, spec):  # a concurrent builder won the rename; its model is ours too
            return out_dir
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("built tiny model in %.0fs at %s", time.perf_counter() - started, out_dir)
    return out_dir
