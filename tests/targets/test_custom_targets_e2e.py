"""End to end, as a user runs it: your own scorer with the ``fdpg-scale`` console script, and a target of several
scorers (a local hf-classifier, your functions, two fitted features) trained on 1 and 2 ranks and evaluated."""

from __future__ import annotations

import json
import math
import re
import subprocess

import pytest
import yaml

from fdpg_scale.models.tiny_classifier import build_tiny_classifier_dir
from tests.harness import REPO as ROOT, SMOKE, metrics, run_cli, side_by_side

SEVERAL = ROOT / "configs" / "smoke-several-scorers.yaml"
pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def fdpg(args: list[str], *, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """``fdpg-scale ARGS`` from the repository root: the console script on 1 rank, torchrun on more."""
    return run_cli(*args, nproc=nproc, console_script=nproc == 1, check=check, timeout=900)


def test_your_own_function_trains_with_the_console_script_and_a_bad_one_is_one_line(tiny_gpt2, tmp_path):
    common = ["train", "--config", str(SMOKE), f"model.path={tiny_gpt2}", "logging.progress_bar=false",
              "target.scorer_args={}", "train.steps=2"]
    fdpg([*common, f"output_dir={tmp_path / 'run'}", "target.kind=reward",
          "target.scorer=examples.my_scorers:has_docstring"])
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and 0.0 <= r["q_alignment_rate"] <= 1.0 for r in rows)
    assert all("alignment" in r and "alignment_se" in r for r in rows)   # one scorer: the old column names

    bad = fdpg([*common, f"output_dir={tmp_path / 'bad'}", "target.scorer=examples.my_scorers:nope"], check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "fdpg-scale: config error: target.scorer 'examples.my_scorers:nope': module 'examples.my_scorers' "
        f"({ROOT / 'examples' / 'my_scorers.py'}) has no attribute 'nope'")
    assert not (tmp_path / "bad" / "checkpoints").exists()   # refused before any engine or step


def _fit_line(log: str) -> str:
    lines = [line for line in log.splitlines() if "fitted on 64 samples for ['positive', 'e_fraction']" in line]
    assert len(lines) == 1, log[-3000:]
    return lines[0]


def test_several_scorers_with_a_classifier_train_on_one_and_two_ranks_and_evaluate(tiny_gpt2, tmp_path):
    classifier = build_tiny_classifier_dir(tmp_path / "classifier", seed=0)
    raw = yaml.safe_load(SEVERAL.read_text())
    for entry in raw["target"]["scorers"]:
        if entry["scorer"] == "hf-classifier":
            entry["scorer_args"]["path"] = str(classifier)
    config = tmp_path / "several.yaml"
    config.write_text(yaml.safe_dump(raw))
    model = tiny_gpt2
    runs = {nproc: tmp_path / f"ranks{nproc}" for nproc in (1, 2)}

    def train(nproc):
        proc = fdpg(["train", "--config", str(config), f"model.path={model}", "train.steps=2",
                     f"output_dir={runs[nproc]}", "logging.progress_bar=false"], nproc=nproc)
        return proc.stdout + proc.stderr

    logs = dict(zip((1, 2), side_by_side(lambda: train(1), lambda: train(2))))

    # Both features' λ fitted jointly, to within fit_lambdas' tolerance (1e-6), the same on 1 and 2 ranks.
    fits = {n: _fit_line(logs[n]) for n in logs}
    for line in fits.values():
        error = float(re.search(r"max\|μ̂ − μ̄\| = ([0-9.e+-]+)", line).group(1))
        assert error < 1e-6, line
        assert "(target [0.55, 0.08])" in line
    lam = {n: json.loads(re.search(r"λ = (\[[^]]*\])", fits[n]).group(1)) for n in fits}
    assert lam[1] == pytest.approx(lam[2], rel=1e-6, abs=1e-9)

    names = ("short", "docstring", "positive", "e_fraction")
    one, two = metrics(runs[1]), metrics(runs[2])
    for a, b in zip(one, two):
        assert "alignment" not in a
        for key in ("loss", "log_z", "kl_p_pi", *[f"alignment/{n}" for n in names]):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key, a[key], b[key])
        for n in names:
            assert f"alignment_se/{n}" in a and f"q_alignment_rate/{n}" in a

    fdpg(["eval", str(runs[2]), "--samples", "16"])
    result = json.loads((runs[2] / "eval.json").read_text())
    for row in ("base", "policy"):
        assert all(math.isfinite(result[row][f"alignment/{n}"]) for n in names)
    assert 0.0 < result["policy"]["alignment/positive"] < 1.0
