"""End-to-end throughput against a peer: TRL's ``GRPOTrainer`` and this project's loop (sync and async) on the
same model, prompts, batch, lengths and learning rate, on this machine.

Both sides: the shipped tiny Countdown model in fp32, the same RL prompts in the same order, 16 prompts x 8
responses per generation batch, at most 48 new tokens at temperature 1.0, lr 1.5e-4, two optimizer updates
per generation batch (TRL: ``per_device_train_batch_size`` 64 x ``steps_per_generation`` 2; the project:
``updates_per_batch`` 2), no KL term, the Countdown reward of ``services/verifier/rules/countdown.py``.
TRL runs in its own environment (``.bench/trl-venv`` from ``requirements/bench-trl.txt``, built by
``--setup``), never in the project's runtime. Each system runs ``--steps`` generation batches; the figures
are medians over the batches after ``--warmup``.

Writes ``bench/results/peer_trl.json`` (completions/s, tokens/s, seconds per phase, CPU-seconds per
completion for each system) and ``peer_trl.png``. Ratios from one run on a quiet machine; never read a
figure from a run taken beside another benchmark or study.

    python bench/peer_trl.py --setup            # once: the TRL environment
    python bench/peer_trl.py [--steps 30] [--warmup 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ASYNC_CORES, REPO, RESULTS, read_jsonl, run_coordinator, synthetic_groups

VENV = REPO / ".bench" / "trl-venv"
PROMPTS, K, MAX_TOKENS, LR = 16, 8, 48, 1.5e-4

# Runs inside the TRL environment: GRPOTrainer on the tiny model with the project's Countdown reward.
_TRL_CHILD = r"""
import importlib.util, json, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

model_dir, rows_path, out_path = sys.argv[1:4]
steps, threads = int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
spec = importlib.util.spec_from_file_location("countdown_rule", sys.argv[6])
rule = sys.modules["countdown_rule"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rule)
rows = [json.loads(line) for line in open(rows_path)]
data = Dataset.from_list([{"prompt": r["prompt"], "nums": r["nums"], "target": r["target"]} for r in rows])

def reward(prompts, completions, nums, target, **_):
    refs = [{"nums": n, "target": t} for n, t in zip(nums, target)]
    return [rule.countdown_rule(c, ref).reward for c, ref in zip(completions, refs)]

class Clock(TrainerCallback):
    def __init__(self): self.marks = []
    def on_step_end(self, args, state, control, **kw): self.marks.append(time.perf_counter())

tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
cfg = GRPOConfig(
    output_dir=out_path + ".trainer", per_device_train_batch_size=%(per_device)d, steps_per_generation=2,
    num_generations=%(k)d, max_completion_length=%(max_tokens)d, learning_rate=%(lr)g, beta=0.0,
    num_iterations=1,
    temperature=1.0, top_p=1.0, max_steps=2 * steps, logging_steps=1, save_strategy="no", report_to="none",
    use_cpu=True, bf16=False, seed=0, shuffle_dataset=False, lr_scheduler_type="constant", warmup_steps=0,
    weight_decay=0.1, max_grad_norm=1.0, dataloader_num_workers=0,
)
clock = Clock()
trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                      callbacks=[clock])
start = time.perf_counter()
trainer.train()
logs = [h for h in trainer.state.log_history if "loss" in h or "reward" in h]
json.dump({"start": start, "step_marks": clock.marks, "logs": logs}, open(out_path, "w"))
"""


def setup() -> None:
    """``.bench/trl-venv`` with ``requirements/bench-trl.txt`` (torch and transformers as in the project)."""
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "-r", str(REPO / "requirements" / "bench-trl.txt")], check=True)
    subprocess.run(
        [
            str(VENV / "bin" / "python"),
            "-m",
            "pip",
            "uninstall",
            "-y",
            "-q",
            "torchvision",
            "torchaudio",
            "torchcodec",
            "triton",
        ],
        check=False,
    )


def _prompt_rows(n: int, path: Path) -> None:
    """The RL prompts the project's run would admit first, in its order (task stream positions 0..n-1)."""
    from services.common.config import load_config
    from services.coordinator.tasks import TaskSource, eval_sets, rl_exclusions, training_problems

    cfg = load_config(REPO / "configs" / "countdown-tiny.yaml")
    held = [p for s in eval_sets(cfg) for p in s.problems]
    source = TaskSource(cfg, training_problems(cfg, exclude=rl_exclusions(cfg, held)), tokenizer=None)
    with path.open("w") as fh:
        for i in range(n):
            p = source._problem(i)
            fh.write(json.dumps({"prompt": p.prompt, **p.reference}) + "\n")


def _prompt_tokens(n: int = 256) -> int:
    """Mean token count of the first ``n`` RL prompts under the tiny model's tokenizer."""
    from transformers import AutoTokenizer

    from services.common.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        _prompt_rows(n, path)
        prompts = [json.loads(line)["prompt"] for line in path.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(str(build_tiny()))
    return round(statistics.mean(len(tok(p)["input_ids"]) for p in prompts))


def _cpu_children() -> float:
    """CPU-seconds the whole machine has spent (``/proc/stat``): a run's Ray workers are not this process's
    waited-for children, so only a machine-wide count sees them (the bench runs on a quiet machine)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    busy = sum(int(x) for i, x in enumerate(fields[:8]) if i not in (3, 4))  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def run_trl(steps: int, warmup: int, threads: int, tmp: Path) -> dict:
    from services.common.tiny import build_tiny

    rows = tmp / "prompts.jsonl"
    _prompt_rows(PROMPTS * steps, rows)
    out = tmp / "trl.json"
    script = _TRL_CHILD % {"per_device": PROMPTS * K // 2, "k": K, "max_tokens": MAX_TOKENS, "lr": LR}
    rule = REPO / "services" / "verifier" / "rules" / "countdown.py"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    cpu0, wall0 = _cpu_children(), time.perf_counter()
    proc = subprocess.run(
        [
            str(VENV / "bin" / "python"),
            "-c",
            script,
            str(build_tiny()),
            str(rows),
            str(out),
            str(steps),
            str(threads),
            str(rule),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"TRL child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    cpu, wall = _cpu_children() - cpu0, time.perf_counter() - wall0
    result = json.loads(out.read_text())
    marks = [result["start"], *result["step_marks"]]
    # Two optimizer steps per generation batch: a batch's time is the time of its pair of steps.
    per_batch = [marks[i + 2] - marks[i] for i in range(0, len(marks) - 2, 2)]
    lengths = [h["completions/mean_length"] for h in result["logs"] if "completions/mean_length" in h]
    return _summary(
        "trl-grpo", per_batch[warmup:], lengths[warmup:], cpu, wall, steps, {"logs": result["logs"][-2:]}
    )


def run_project(
    mode: str,
    steps: int,
    warmup: int,
    tmp: Path,
    cores: tuple[int, int] = (1, 1),
    whole_rows: bool = False,
    extra: tuple[str, ...] = (),
) -> dict:
    """The project's loop, ``sync`` or ``async``; ``cores``: the async run's (generator, learner) CPUs,
    which Ray turns into each actor's OpenMP threads (more in all than the machine has oversubscribes it).
    ``whole_rows``: the learner without the shared-prefix forward (``learner.shared_prefix=false``), the
    profile before that change. ``extra``: overrides added to every project row (``--set``), named in the
    row's ``overrides``."""
    overrides = [
        f"coordinator.steps={steps}",
        "coordinator.eval_every=0",
        "coordinator.eval_problems=8",
        "coordinator.eval_samples=1",
        "coordinator.eval_k=1",
        "learner.checkpoint_every=0",
        f"learner.lr={LR}",
        f"coordinator.prompts_per_step={PROMPTS}",
        f"coordinator.group_size={K}",
        f"generator.max_tokens={MAX_TOKENS}",
        "learner.updates_per_batch=2",
        "metrics.enabled=false",
    ]
    name = f"project-{mode}"
    if mode == "async":
        overrides += ["coordinator.max_policy_lag=1", *ASYNC_CORES]
        if cores != (1, 1):
            overrides += [f"cluster.generator.num_cpus={cores[0]}", f"cluster.learner.num_cpus={cores[1]}"]
            name += f"-g{cores[0]}l{cores[1]}"
    if whole_rows:
        overrides.append("learner.shared_prefix=false")
        name += "-whole-rows"
    overrides += extra
    cpu0, wall0 = _cpu_children(), time.perf_counter()
    run_dir = run_coordinator(overrides, tmp, f"peer-{name}")
    cpu, wall = _cpu_children() - cpu0, time.perf_counter() - wall0
    steps_log = read_jsonl(run_dir / "metrics.jsonl")[warmup:]
    return _summary(
        name,
        [s["step_s"] for s in steps_log],
        [s["response_length_mean"] for s in steps_log],
        cpu,
        wall,
        steps,
        {"profile_s": profile(steps_log, mode), **({"overrides": list(extra)} if extra else {})},
    )


def profile(steps_log: list[dict], mode: str) -> dict[str, float]:
    """Where a batch's seconds go (medians over the measured batches; they need not add up exactly).

    The coordinator's phases: ``admit``, ``collect`` (waiting for the batch's groups), ``train`` (the
    learner call), ``publish``. Inside ``train``: the learner's ``proximal`` pass, its ``update``s and
    ``train_overhead`` (the Ray call, packing, the metrics reduce). The actors' seconds in the same interval:
    the generator's ``generate`` (sampling and forwarding the groups) and ``weights`` (fetching and loading
    the snapshot in place), the verifier's ``verify``. In sync mode the collect phase is the generator's
    and verifier's time plus ``queue_and_handoffs`` (the stream hops and waits between them); in async
    mode the actors run beside the learner and ``collect`` is what the learner waited.
    """

    def med(get) -> float:
        return round(statistics.median(get(s) for s in steps_log), 4)

    out = {k: med(lambda s, k=k: s["phase_s"].get(k, 0.0)) for k in ("admit", "collect", "train", "publish")}
    out |= {
        "proximal": med(lambda s: s["proximal_s"]),
        "update": med(lambda s: s["update_s"]),
        "train_overhead": med(lambda s: s["phase_s"]["train"] - s["proximal_s"] - s["update_s"]),
        "generate": med(lambda s: s["generate_s"]),
        "weights": med(lambda s: s.get("weights_s", 0.0)),
        "verify": med(lambda s: s["verify_s"]),
    }
    if mode == "sync":
        out["queue_and_handoffs"] = med(
            lambda s: max(
                s["phase_s"]["collect"] - s["generate_s"] - s.get("weights_s", 0.0) - s["verify_s"], 0.0
            )
        )
    out["step"] = med(lambda s: s["step_s"])
    return out


def learner_floor(prompt_tokens: int, response_tokens: int) -> list[dict]:
    """The floor under the learner's phases: the model's own forward/backward on the batch's tokens (the
    tiny config's shape, no padding: every prompt ``prompt_tokens`` long, every response
    ``response_tokens``), without the objective, the optimizer, DeepSpeed or Ray: what one step's compute
    costs (a no-grad forward of the second mini-batch for the proximal pass, a forward + backward per
    update), on 1 and 2 threads, for whole rows and for the shared-prefix forward."""
    import torch
    from transformers import AutoModelForCausalLM

    from services.common.tiny import build_tiny
    from services.learner.batch import pack_groups
    from services.learner.logprobs import response_logprobs

    model = AutoModelForCausalLM.from_pretrained(str(build_tiny()), dtype=torch.float32)
    vocab = model.config.vocab_size
    batch = pack_groups(synthetic_groups(PROMPTS, K, prompt_tokens, response_tokens, vocab), pad_id=0)
    halves = [batch.take(range(0, PROMPTS // 2)), batch.take(range(PROMPTS // 2, PROMPTS))]

    def logp(b, shared: bool, grad: bool):
        with torch.set_grad_enabled(grad):
            out, _ = response_logprobs(
                model, b.input_ids, b.attention_mask, b.positions, b.mask,
                prompt_lens=b.prompt_lens if shared else None, group_size=K,
            )  # fmt: skip
        return out

    rows = []
    threads_before = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for shared in (False, True):
            times = {"proximal": [], "update": []}
            for _ in range(5):
                t0 = time.perf_counter()
                logp(halves[1], shared, grad=False)
                t1 = time.perf_counter()
                for half in halves:
                    logp(half, shared, grad=True).sum().backward()
                times["proximal"].append(t1 - t0)
                times["update"].append(time.perf_counter() - t1)
                model.zero_grad()
            rows.append({
                "threads": threads,
                "forward": "shared-prefix" if shared else "whole rows",
                **{k: round(statistics.median(v[1:]), 4) for k, v in times.items()},
            })  # fmt: skip
    torch.set_num_threads(threads_before)
    return rows


def _summary(
    system: str, batch_s: list[float], lengths: list[float], cpu: float, wall: float, steps: int, extra: dict
) -> dict:
    median = statistics.median(batch_s)
    tokens = statistics.median(lengths) * PROMPTS * K if lengths else float("nan")
    return {
        "system": system,
        "s_per_batch": round(median, 4),
        "completions_per_s": round(PROMPTS * K / median, 2),
        "tokens_per_s": round(tokens / median, 1),
        "cpu_s_per_completion": round(cpu / (steps * PROMPTS * K), 5),
        "wall_s": round(wall, 1),
        "batches_measured": len(batch_s),
        **extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="build the TRL environment and exit")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the TRL process")
    parser.add_argument(
        "--systems", nargs="+", default=["trl", "sync", "async"], choices=["trl", "sync", "async"]
    )
    parser.add_argument(
        "--async-cores",
        nargs="+",
        default=["1:1"],
        help="generator:learner CPUs of each async row (default 1:1, the shipped async split)",
    )
    parser.add_argument(
        "--before",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the project's rows without the shared-prefix forward (the profile before it)",
    )
    parser.add_argument(
        "--floor", action=argparse.BooleanOptionalAction, default=True, help="the model's own fwd/bwd floor"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--set", dest="extra", action="append", default=[], help="section.field=value for every project row"
    )
    args = parser.parse_args()
    splits = [tuple(int(x) for x in c.split(":")) for c in args.async_cores]
    if any(len(c) != 2 or min(c) < 1 for c in splits):
        raise SystemExit(f"--async-cores: give GENERATOR:LEARNER CPUs, e.g. 1:1 1:2; got {args.async_cores}")
    if args.setup:
        setup()
        return
    if "trl" in args.systems and not (VENV / "bin" / "python").exists():
        raise SystemExit(f"no TRL environment at {VENV}: run `python bench/peer_trl.py --setup` first")
    rows, extra = [], tuple(args.extra)
    with tempfile.TemporaryDirectory() as tmp:
        for system in args.systems:
            if system == "trl":
                rows.append(run_trl(args.steps, args.warmup, args.threads, Path(tmp)))
            else:
                for cores in splits if system == "async" else [(1, 1)]:
                    for whole in (False, True) if args.before else (False,):
                        row = run_project(system, args.steps, args.warmup, Path(tmp), cores, whole, extra)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                continue
            print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r["system"] == "trl-grpo"), None)
    for r in rows:
        if base is not None:
            r["completions_per_s_vs_trl"] = round(r["completions_per_s"] / base["completions_per_s"], 3)
    load = os.getloadavg()
    floor = []
    if args.floor:
        lengths = [r["tokens_per_s"] * r["s_per_batch"] / (PROMPTS * K) for r in rows if "profile_s" in r]
        response_tokens = round(statistics.median(lengths)) if lengths else 28
        floor = learner_floor(_prompt_tokens(), response_tokens)
    payload = {
        "steps": args.steps,
        "warmup": args.warmup,
        "prompts": PROMPTS,
        "k": K,
        "max_tokens": MAX_TOKENS,
        "lr": LR,
        "loadavg_at_end": load,
        "cpus": os.cpu_count(),
        "rows": rows,
        "learner_floor_s": floor,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peer_trl.json").write_text(json.dumps(payload, indent=2) + "\n")
    _plot(rows, args.out / "peer_trl.png")


def _plot(rows: list[dict], path: Path) -> None:
    """Completions/s per system, and where each project row's batch goes (the profile, stacked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1, 1.3]})
    names = [r["system"] for r in rows]
    ax.barh(
        names, [r["completions_per_s"] for r in rows], color=["C1" if "trl" in n else "C0" for n in names]
    )
    ax.invert_yaxis()
    ax.set_xlabel("completions / s")
    ax.set_title("tiny Countdown, 16 x 8 per batch, 48 tokens, 2 cores", fontsize=9)
    project = [r for r in rows if "profile_s" in r]
    parts = ("collect", "proximal", "update", "train_overhead", "publish", "admit")
    left = [0.0] * len(project)
    for i, part in enumerate(parts):
        widths = [r["profile_s"].get(part, 0.0) for r in project]
        bx.barh([r["system"] for r in project], widths, left=left, color=f"C{i + 2}", label=part)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    bx.invert_yaxis()
    bx.set_xlabel("seconds per batch (medians)")
    bx.set_title("where a batch goes: the coordinator's phases, train split by the learner", fontsize=9)
    bx.legend(fontsize=7, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
