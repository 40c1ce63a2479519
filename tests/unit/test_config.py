"""The config tree: load order, errors that name the field, every shipped YAML parses, no heavy imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.common.config import (
    ConfigError,
    RunConfig,
    build_config,
    dump_config,
    load_config,
    parse_override,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))


def test_shipped_configs_exist() -> None:
    assert REPO / "configs" / "countdown-tiny.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_parses_and_round_trips(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # the resolved dump is itself a valid config equal to the original
    assert build_config(yaml.safe_load(dump_config(cfg))) == cfg


def test_load_order_defaults_yaml_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("learner:\n  lr: 0.001\n  objective: pg\ncoordinator:\n  steps: 7\n")
    cfg = load_config(path, ["learner.lr=2e-4", "coordinator.group_size=4"])
    assert cfg.learner.lr == 2e-4  # override beats YAML
    assert cfg.learner.objective == "pg"  # YAML beats default
    assert cfg.coordinator.steps == 7 and cfg.coordinator.group_size == 4
    assert cfg.learner.weight_decay == RunConfig().learner.weight_decay  # default kept


def test_override_values_are_typed() -> None:
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=1e-5") == ("a.b", 1e-5)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=redis://x:1/0") == ("a.b", "redis://x:1/0")
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_override("learner.lr")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("learner.lr=-1", ["learner.lr", "greater than 0", "-1"]),
        ("learner.objective=ppo", ["learner.objective", "'lpo_fwd'", "'ppo'"]),
        ("learner.lrr=1", ["learner.lrr", "unknown field", "lr,"]),
        ("bogus.x=1", ["bogus", "unknown field", "learner"]),
        ("learner.temperature=fixed", ["learner.tau"]),
        ("learner.tau=0.5", ["only used with temperature 'fixed'"]),
        ("generator.max_tokens=500", ["generator.max_tokens (500)", "model.max_model_len"]),
        ("coordinator.eval_k=16", ["eval_k (16)", "eval_samples (8)"]),
        ("queue.redis_url=localhost:6379", ["queue.redis_url", "redis://"]),
        ("learner.world_size=32", ["prompts_per_step (16)", "world_size (32)"]),
        ("coordinator.run_name=a/b", ["coordinator.run_name", "'a/b'"]),
        ("data.task=math", ["task 'math' needs data.train_path and an evaluation file (data.eval_path"]),
        ("data.prompt_template=r1", ["'tiny:countdown' only knows", "prompt_template 'r1'"]),
        ("data.task=sql", ["data.task", "'countdown'", "'math'", "'code'"]),
        ("data.task=code", ["task 'code' needs data.train_path and an evaluation file"]),
        ('cluster.generator.resources={"GPU": 1}', ["cluster.generator", "GPU=1", "num_cpus/num_gpus"]),
        ('cluster.learner.resources={"head": -1}', ["cluster.learner", "head=-1", "amount >= 0"]),
    ],
)
def test_errors_name_field_value_and_fix(override: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs" / "countdown-tiny.yaml", [override])
    for fragment in expected:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(bad)
    bad.write_text("learner: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_every_field_is_documented() -> None:
    def walk(model: type) -> list[str]:
        missing = []
        for name, info in model.model_fields.items():
            if not info.description:
                missing.append(f"{model.__name__}.{name}")
            ann = info.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                missing += walk(ann)
        return missing

    assert walk(RunConfig) == []


def test_config_import_pulls_in_no_heavy_framework() -> None:
    code = (
        "import sys, services.common.config, services.coordinator.cli;"
        "heavy = [m for m in ('torch', 'vllm', 'deepspeed', 'ray', 'transformers') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_dry_run_prints_resolved_config() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.coordinator",
            "--config",
            "configs/countdown-tiny.yaml",
            "--set",
            "learner.lr=3e-4",
            "--dry-run",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    resolved = yaml.safe_load(out.stdout)
    assert resolved["learner"]["lr"] == 3e-4
    assert build_config(resolved) == load_config(
        REPO / "configs" / "countdown-tiny.yaml", ["learner.lr=3e-4"]
    )


def test_cli_config_error_exits_2_without_traceback() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services.coordinator", "--set", "learner.lr=-1", "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "learner.lr" in out.stderr and "Traceback" not in out.stderr


def _coordinator_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.coordinator", *args], cwd=REPO, capture_output=True, text=True
    )


def test_resume_reads_the_run_directory_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "my-run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("learner:\n  lr: 2.0e-4\ncoordinator:\n  steps: 7\n")
    out = _coordinator_cli("--resume", str(run_dir), "--set", "coordinator.steps=9", "--dry-run")
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert resolved["learner"]["lr"] == 2e-4 and resolved["coordinator"]["steps"] == 9
    assert resolved["coordinator"]["run_name"] == "my-run"
    assert resolved["coordinator"]["runs_dir"] == str(tmp_path.resolve())


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--resume", "{tmp}/nothing"], "no config.yaml there"),
        (["--resume", "{tmp}", "--config", "configs/countdown-tiny.yaml"], "drop --config"),
    ],
)
def test_bad_resume_exits_2_naming_the_fix(tmp_path: Path, args: list[str], expected: str) -> None:
    out = _coordinator_cli(*[a.format(tmp=tmp_path) for a in args], "--dry-run")
    assert out.returncode == 2 and expected in out.stderr and "Traceback" not in out.stderr


def test_update_norm_logging_is_refused_with_zero3() -> None:
    from services.common.config import LearnerConfig

    with pytest.raises(ValueError, match="learner.log_update_norm needs the full weights"):
        LearnerConfig(log_update_norm=True, zero_stage=3)
    assert LearnerConfig(log_update_norm=True, zero_stage=2).log_update_norm
