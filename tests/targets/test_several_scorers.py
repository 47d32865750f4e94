"""Several scorers in one target: P = a · Π b_i · exp(Σ r_j/β_j + Σ λ_k φ_k), one alignment column each, and
λ of several features fitted jointly (with the other factors of the target in the fit)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fdpg_scale.errors import ConfigError
from fdpg_scale.targets.samples import Samples
from fdpg_scale.targets.tasks import build_task
from fdpg_scale.training.alignment import alignment_columns
from fdpg_scale.training.config import TargetConfig, load_config
from fdpg_scale.training.target_fitting import describe_fit, fit_task
from tests.helpers import assert_close

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["def f(x):\n    return x\n", "x = 1", "", "print('def')  # def", "eee e", "'''doc e'''", "self.e = 1"]


def samples(texts=TEXTS) -> Samples:
    n = len(texts)
    return Samples(token_ids=torch.zeros(n, 2, dtype=torch.long), mask=torch.ones(n, 2, dtype=torch.bool),
                   texts=list(texts))


def mixed_config(**overrides) -> TargetConfig:
    scorers = [
        {"scorer": "contains", "kind": "pointwise", "scorer_args": {"substring": "e"}},
        {"scorer": "count", "kind": "reward", "scorer_args": {"substring": "def"}, "beta": 0.5},
        {"scorer": "examples.my_scorers:char_fraction", "kind": "feature", "scorer_args": {"chars": "e"},
         "moment": 0.2},
        {"scorer": "examples.my_scorers:has_docstring", "kind": "feature", "moment": 0.3, "name": "doc"},
    ]
    return TargetConfig(scorers=scorers, **overrides)


def expected_features(texts=TEXTS):
    b = torch.tensor([float("e" in t) for t in texts])
    r = torch.tensor([float(t.count("def")) for t in texts])
    phi1 = torch.tensor([t.count("e") / len(t) if t else 0.0 for t in texts])
    phi2 = torch.tensor([float("'''" in t or '"""' in t) for t in texts])
    return b, r, phi1, phi2


def test_the_energy_combines_constraints_rewards_and_features(monkeypatch):
    monkeypatch.chdir(ROOT)
    task = build_task(mixed_config())
    assert task.names == ("contains", "count", "char_fraction", "doc")
    assert task.moment == [0.2, 0.3] and task.moments == (0.2, 0.3)
    b, r, phi1, phi2 = expected_features()
    features = task.features(samples())
    assert_close(features["contains"], b, name="b")
    assert_close(features["count"], r, name="r")
    assert_close(features["char_fraction"], phi1, name="φ1")
    assert_close(features["doc"], phi2, name="φ2")
    assert_close(task.target.log_scores(samples()), torch.log(b) + r / 0.5, name="λ = 0")
    fitted = task.with_lambdas([1.5, -2.0])
    assert_close(fitted.target.log_scores(samples()), torch.log(b) + r / 0.5 + 1.5 * phi1 - 2.0 * phi2,
                 name="log b + r/β + λ·φ")


def test_the_list_form_reads_from_yaml_and_old_single_scorer_configs_keep_working(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: {path: m}\ntarget:\n  scorers:\n"
                      "    - {scorer: contains, scorer_args: {substring: e}}\n"
                      "    - {scorer: 'examples.my_scorers:has_docstring', kind: reward, beta: 2.0}\n")
    cfg = load_config(config)
    assert [s.scorer for s in cfg.target.scorers] == ["contains", "examples.my_scorers:has_docstring"]
    assert cfg.target.scorers[1].beta == 2.0 and cfg.target.scorers[0].kind == "pointwise"
    smoke = load_config(ROOT / "configs" / "smoke.yaml")
    assert smoke.target.scorers == [] and build_task(smoke.target).names == ("contains",)


def test_inconsistent_lists_are_one_line_errors(monkeypatch):
    monkeypatch.chdir(ROOT)
    entry = {"scorer": "contains", "scorer_args": {"substring": "e"}}
    cases = [
        (lambda: TargetConfig(scorers=[entry], kind="reward"),
         r"target.scorers replaces target.kind: set kind inside each entry"),
        (lambda: TargetConfig(scorers=[entry], scorer_args={"substring": "x"}), r"replaces target.scorer_args"),
        (lambda: TargetConfig(scorers=[{"scorer": "count", "kind": "feature"}]), r"moment is required"),
        (lambda: TargetConfig(scorers=[{"scorer": "count", "kind": "reward", "moment": 1.0}]),
         r"moment is only for kind 'feature'"),
        (lambda: TargetConfig(scorers=[{"scorer": "count", "kind": "distributional"}]),
         r"must be one of pointwise, reward, feature"),
        (lambda: build_task(TargetConfig(scorers=[entry, entry])),
         r"two scorers are named 'contains'; give each a distinct 'name'"),
        (lambda: build_task(TargetConfig(scorers=[entry, {"scorer": "count"}])),
         r"target.scorers\[1\].scorer_args for 'count' must be exactly \['substring'\]"),
        (lambda: TargetConfig(scorers=[{**entry, "kind": "feature", "moment": 0.5}], prompts_file="p.jsonl"),
         r"not supported"),
    ]
    for make, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as err:
            make()
        assert "\n" not in str(err.value)


def test_two_features_fit_jointly_to_within_the_tolerance(monkeypatch):
    """Draws from a known q over the texts; the fit must hit both moments to within fit_lambdas' tolerance, and
    the fitted λ must give the same moments under the exact p (enumeration), up to sampling error."""
    monkeypatch.chdir(ROOT)
    task = build_task(mixed_config())
    everything = samples()
    b, r, phi1, phi2 = expected_features()
    phi = torch.stack([phi1, phi2], -1).double()
    log_a = torch.log_softmax(torch.linspace(-1.0, 1.0, len(TEXTS), dtype=torch.float64), 0)
    log_q = torch.log_softmax(torch.zeros(len(TEXTS), dtype=torch.float64), 0)   # q uniform, a not
    draws = torch.multinomial(log_q.exp(), 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    log_scores = task.target.log_scores(everything).double()
    fitted, fit = fit_task(task, phi[draws], log_a[draws], log_scores[draws], log_q[draws])
    assert fit.error < 1e-6
    assert_close(fit.moments, torch.tensor([0.2, 0.3], dtype=torch.float64), rtol=0, atol=1e-6, name="μ̂")
    assert fitted.exponential.lambdas.tolist() == fit.lambdas.tolist()
    # Exact moments of p ∝ a·b·exp(r/β)·exp(λ·φ) over the enumeration: the constraint b and reward r count.
    log_p = log_a + fitted.target.log_scores(everything).double()
    p = torch.softmax(log_p, 0)
    exact = p @ phi
    assert_close(exact, fit.moments, rtol=0, atol=4 * float(fit.moment_stderr.max()) + 1e-3, name="E_p[φ]")
    line = describe_fit(fitted, fit, 20000)
    assert "max|μ̂ − μ̄| = " in line and "(target [0.2, 0.3])" in line and "fitted on 20000 samples" in line


def test_alignment_columns_one_per_scorer_and_the_old_name_for_one():
    metrics = {"kl_p_pi": 1.0, "phi_mean/a": 0.1, "phi_mean_se/a": 0.01, "phi_mean/b": 0.2, "phi_mean_se/b": 0.02}
    features = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([2.0, 2.0])}
    assert alignment_columns(metrics, features) == {
        "kl_p_pi": 1.0, "alignment/a": 0.1, "alignment_se/a": 0.01, "q_alignment_rate/a": 0.5,
        "alignment/b": 0.2, "alignment_se/b": 0.02, "q_alignment_rate/b": 2.0}
    single = alignment_columns({"phi_mean/a": 0.1, "phi_mean_se/a": 0.01}, {"a": torch.tensor([1.0])})
    assert single == {"alignment": 0.1, "alignment_se": 0.01, "q_alignment_rate": 1.0}
    assert math.isfinite(single["alignment"])
