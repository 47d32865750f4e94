"""Before any engine exists: the model directory and the DeepSpeed config are checked with one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fdpg_scale.training.config import ConfigError, load_config
from fdpg_scale.training.run_setup import deepspeed_config, prepare_model_dir

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"


def test_deepspeed_config_derives_batch_sizes_and_clipping():
    cfg = load_config(SMOKE, ["train.global_batch=8", "train.micro_batch=2", "train.grad_clip=0.5"])
    ds = deepspeed_config(cfg, world_size=2, accumulation=cfg.train.accumulation_steps(2))
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 2)
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is False


@pytest.mark.parametrize("patch, needle", [
    ({"train_batch_size": 64}, "sets train_batch_size=64"),
    ({"zero_optimization": {"stage": 2}}, "stage must be 3"),
    ({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}, "zero_optimization.reduce_bucket_size is \"auto\""),
])
def test_deepspeed_json_contradictions_are_named(tmp_path, patch, needle):
    ds = json.loads((ROOT / "configs/deepspeed/zero3_cpu.json").read_text())
    ds.update(patch)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    cfg = load_config(SMOKE, [f"deepspeed.config={path}"])
    with pytest.raises(ConfigError, match=None) as info:
        deepspeed_config(cfg, world_size=1, accumulation=2)
    assert needle in str(info.value)


def test_missing_or_non_causal_model_directory_is_named(tmp_path):
    cfg = load_config(SMOKE, [f"model.path={tmp_path / 'nope'}", "model.build="])
    with pytest.raises(ConfigError, match="is not a directory"):
        prepare_model_dir(cfg.model)
    (tmp_path / "empty").mkdir()
    cfg = load_config(SMOKE, [f"model.path={tmp_path / 'empty'}", "model.build="])
    with pytest.raises(ConfigError, match="no config.json"):
        prepare_model_dir(cfg.model)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    cfg = load_config(SMOKE, [f"model.path={tmp_path / 'bert'}", "model.build="])
    with pytest.raises(ConfigError, match="not a causal LM"):
        prepare_model_dir(cfg.model)


def test_cli_reports_config_errors_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "fdpg_scale.cli", "train", "--config", str(SMOKE), "train.stepz=1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("fdpg-scale: config error: unknown config key 'train.stepz'")


def test_unwritable_output_dir_is_named(tmp_path):
    from fdpg_scale.training.run_setup import prepare_output_dir

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits: use a path under a regular file instead
            target = tmp_path / "file"
            target.write_text("")
            target = target / "run"
        else:
            target = locked / "run"
        with pytest.raises(ConfigError, match="is not writable"):
            prepare_output_dir(target)
    finally:
        locked.chmod(0o700)
