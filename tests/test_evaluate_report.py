"""`fdpg-scale eval` and `fdpg-scale sweep` on the smoke config: the table, the plots, the bad-input errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train_e2e import ROOT, SMOKE, _env, run_train

pytestmark = [pytest.mark.slow]


def _colored_fraction(png: Path) -> float:
    """Fraction of pixels that are neither white nor grey/black: the plotted data, not the axes frame."""
    import matplotlib.image as mpimg

    img = mpimg.imread(png)[..., :3]
    spread = img.max(-1) - img.min(-1)
    return float((spread > 0.15).mean())


def test_sweep_trains_evaluates_and_writes_table_and_plots(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "fdpg_scale.cli", "sweep", "--configs", str(SMOKE), "--divergences",
                           "kl", "rkl", "--out", str(out), "--eval-samples", "48", f"model.path={tmp_path / 'model'}",
                           "train.steps=2"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = (out / "report.md").read_text()
    assert "| base model a |" in report and "| f-DPG kl |" in report and "| f-DPG rkl |" in report
    for name in ("smoke_alignment_vs_diversity.png", "smoke_kl_per_step.png"):
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert name in report
        assert _colored_fraction(png) > 0.001, f"{name} shows no data"
    ev = json.loads((out / "smoke" / "kl" / "eval.json").read_text())
    for row in ("base", "policy"):
        for key in ("alignment", "kl_p_pi", "kl_pi_a", "distinct_1", "distinct_2", "self_bleu_3"):
            assert isinstance(ev[row][key], float), (row, key)
    # p = a·b/Z, so KL(p‖a) = −log Z; eval estimates both from the same base draws, so they agree exactly.
    assert math.isclose(ev["base"]["kl_p_pi"], -math.log(ev["base_satisfaction_rate"]), rel_tol=1e-6)
    assert ev["policy"]["kl_pi_a"] > 0.0       # two steps moved π away from a (KL(π‖a) from π's own samples)
    assert 0.0 <= ev["policy"]["alignment"] <= 1.0


def test_unsatisfiable_constraint_is_reported_with_its_rate(tmp_path):
    out = tmp_path / "never"
    run_train(tmp_path, out, "train.steps=1", "target.scorer_args.substring=QQQQQQQQQQ")
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["log_z"] is None            # no sample with P > 0 yet: no estimate, logged as null, not 0.0
    proc = subprocess.run([sys.executable, "-m", "fdpg_scale.cli", "eval", str(out), "--samples", "16"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "holds on 0/16 base samples" in proc.stderr.strip().splitlines()[-1]


def test_eval_of_a_directory_without_checkpoint_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fdpg_scale.cli", "export", str(tmp_path), "--to",
                           str(tmp_path / "hf")], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("fdpg-scale: ") and "no checkpoint" in proc.stderr


def test_conditional_target_trains_per_context_and_evaluates(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("def main():\n", "import os\n", "class A:\n")))
    out = tmp_path / "cond"
    run_train(tmp_path, out, "train.steps=2", f"target.prompts_file={prompts}")
    state = __import__("torch").load(out / "checkpoints" / "step_00000002" / "trainer_state.pt", weights_only=True)
    assert len(state["log_z"]["log_sum"]) == 3                          # one Z(c) per prompt
    proc = subprocess.run([sys.executable, "-m", "fdpg_scale.cli", "eval", str(out), "--samples", "24"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads((out / "eval.json").read_text())
    assert ev["contexts_with_support"].endswith("/3")
