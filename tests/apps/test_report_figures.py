"""The report's figures name their metrics on every axis and draw the training estimate with its band and the
evaluation points (fdpg_scale/apps/report.py), on made-up runs: no training needed."""

from __future__ import annotations

import math

import matplotlib
import pytest

from fdpg_scale.apps import report

matplotlib.use("Agg")


def _row(kl: float, **extra) -> dict:
    return {"alignment": 0.4, "alignment_se": 0.02, "kl_p_pi": kl, "kl_p_pi_se": 0.1, "kl_pi_a": 0.5,
            "distinct_1": 0.2, "distinct_2": 0.8, "self_bleu_3": 0.3, **extra}


def _runs() -> list[dict]:
    metrics = [{"step": s, "kl_p_pi": 3.0 - 0.1 * s, "kl_p_pi_se": 0.2} for s in range(1, 11)]
    return [{"eval": {"divergence": d, "base": _row(3.0), "policy": _row(2.0)}, "metrics": metrics}
            for d in ("kl", "js")]


def test_running_estimate_is_a_trailing_mean_with_the_se_of_a_mean():
    means, ses = report.running_estimate([1.0, 3.0, 5.0, 7.0], [1.0, 1.0, None, 1.0], window=2)
    assert means == [1.0, 2.0, 4.0, 6.0]
    assert ses[0] == 1.0 and math.isclose(ses[1], math.sqrt(2) / 2) and ses[2] == 0.5 and ses[3] == 0.5


@pytest.fixture
def captured(monkeypatch):
    """The matplotlib figures the report saves, kept open for inspection."""
    import matplotlib.pyplot as plt

    figures, real_close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    yield figures
    for fig in list(figures):
        real_close(fig)


def test_alignment_vs_diversity_axes_name_their_metric(tmp_path, captured):
    report.plot_alignment_vs_diversity(_runs(), tmp_path / "scatter.png", title="t")
    axes = captured[-1].axes
    assert [ax.get_xlabel() for ax in axes] == ["Distinct-2 (higher = more diverse)",
                                                "Self-BLEU-3 (lower = more diverse)"]
    assert all(ax.get_ylabel() == "alignment E_π[φ]" for ax in axes)


def test_divergence_per_step_has_band_and_evaluation_points(tmp_path, captured):
    report.plot_divergence_per_step(_runs(), tmp_path / "curve.png", title="t")
    ax = captured[-1].axes[0]
    assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel() == "KL(p‖π) (nats)"
    labels = ax.get_legend_handles_labels()[1]
    assert "base a (evaluation)" in labels
    assert "kl: training, 5-step mean ± SE" in labels and "js: evaluation" in labels
    assert len(ax.collections) >= 2                                   # one filled band per run
