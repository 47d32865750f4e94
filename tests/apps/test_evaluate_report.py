"""`fdpg-scale eval` and `fdpg-scale sweep` on the smoke config: the table, the plots, the bad-input errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.harness import SMOKE, run_cli, run_train



def _colored_fraction(png: Path) -> float:
    """Fraction of pixels that are neither white nor grey/black: the plotted data, not the axes frame."""
    import matplotlib.image as mpimg

    img = mpimg.imread(png)[..., :3]
    spread = img.max(-1) - img.min(-1)
    return float((spread > 0.15).mean())


@pytest.mark.slow
def test_sweep_trains_evaluates_and_writes_table_and_plots(tiny_gpt2, tmp_path):
    out = tmp_path / "sweep"
    run_cli("sweep", "--configs", str(SMOKE), "--divergences", "kl", "rkl", "--out", str(out), "--eval-samples", "48",
            f"model.path={tiny_gpt2}", "train.steps=2")
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


@pytest.mark.slow
def test_unsatisfiable_constraint_is_reported_with_its_rate(tiny_gpt2, tmp_path):
    out = tmp_path / "never"
    run_train(out, "train.steps=1", "target.scorer_args.substring=QQQQQQQQQQ", model=tiny_gpt2)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["log_z"] is None            # no sample with P > 0 yet: no estimate, logged as null, not 0.0
    proc = run_cli("eval", str(out), "--samples", "16", "--base-samples", "16", check=False, timeout=300)
    assert proc.returncode == 2
    assert "holds on 0/16 base samples" in proc.stderr.strip().splitlines()[-1]


def test_eval_of_a_directory_without_checkpoint_is_one_line(tmp_path):
    proc = run_cli("export", str(tmp_path), "--to", str(tmp_path / "hf"), check=False, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("fdpg-scale: ") and "no checkpoint" in proc.stderr


@pytest.mark.slow
def test_conditional_target_trains_per_context_and_evaluates(tiny_gpt2, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("def main():\n", "import os\n", "class A:\n")))
    out = tmp_path / "cond"
    run_train(out, "train.steps=2", f"target.prompts_file={prompts}", model=tiny_gpt2)
    state = __import__("torch").load(out / "checkpoints" / "step_00000002" / "trainer_state.pt", weights_only=True)
    assert len(state["log_z"]["log_sum"]) == 3                          # one Z(c) per prompt
    run_cli("eval", str(out), "--samples", "24", timeout=300)
    ev = json.loads((out / "eval.json").read_text())
    assert ev["contexts_with_support"].endswith("/3")


def _eval_row(**alignment) -> dict:
    return {**alignment, "kl_p_pi": 1.0, "kl_p_pi_se": 0.1, "kl_pi_a": 0.5, "distinct_1": 0.2, "distinct_2": 0.8,
            "self_bleu_3": 0.3}


def test_report_of_a_several_scorer_target_has_one_alignment_column_per_scorer(tmp_path):
    from fdpg_scale.apps.report import plot_alignment_vs_diversity, results_table

    base = _eval_row(**{"alignment/fn": 0.1, "alignment_se/fn": 0.01, "alignment/doc": 0.2, "alignment_se/doc": 0.02})
    runs = [{"eval": {"divergence": d, "base": base,
                      "policy": _eval_row(**{"alignment/fn": a, "alignment_se/fn": 0.03, "alignment/doc": b,
                                             "alignment_se/doc": 0.04})}}
            for d, a, b in (("kl", 0.6, 0.5), ("js", 0.7, 0.4))]
    lines = results_table(runs).splitlines()
    assert lines[0].startswith("| model | alignment doc | alignment fn | KL(p‖π) |"), lines[0]
    assert lines[2].startswith("| base model a | 0.200 ± 0.020 | 0.100 ± 0.010 | 1.000 ± 0.100 |"), lines[2]
    assert lines[4].startswith("| f-DPG js | 0.400 ± 0.040 | 0.700 ± 0.030 |"), lines[4]
    png = plot_alignment_vs_diversity(runs, tmp_path / "scatter.png", title="two scorers")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a one-scorer target keeps its single column
    one = [{"eval": {"divergence": "kl", "base": _eval_row(alignment=0.1, alignment_se=0.01),
                     "policy": _eval_row(alignment=0.6, alignment_se=0.03)}}]
    assert results_table(one).splitlines()[0].startswith("| model | alignment E[φ] | KL(p‖π) |")


@pytest.mark.slow
def test_evaluate_model_of_the_base_itself_is_the_base_row(tiny_gpt2):
    """``evaluate_model`` evaluates any saved model (benchmarks/vs_disco.py: another library's): given the base
    itself as π, the policy row's KL(p‖π) is the base row's KL(p‖a) (same draws, same log-probs) and the
    rejection-sampled gain is exactly 0."""
    from fdpg_scale.apps.evaluate import eval_seed, evaluate_model
    from fdpg_scale.training.config import load_config

    cfg = load_config(SMOKE, [f"model.path={tiny_gpt2}", "seed=3"])
    ev = evaluate_model(cfg, tiny_gpt2, n=16, n_base=64)
    assert ev["seed"] == eval_seed(3) and ev["n_base"] == 64 and ev["policy_dir"] == str(tiny_gpt2)
    assert ev["policy"]["kl_p_pi"] == pytest.approx(ev["base"]["kl_p_pi"], rel=1e-9)
    assert ev["kl_gain_rs"] == pytest.approx(0.0, abs=1e-9) and ev["kl_gain_rs_draws"] > 0
    with pytest.raises(ValueError, match="samples must be an int"):
        evaluate_model(cfg, tiny_gpt2, n=0)
