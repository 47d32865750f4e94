"""The config side of the outside-support rule: ``divergence.outside_support_reward``.

A pointwise target (P = a·b, b ∈ {0, 1}) puts samples outside the support; rkl, rchi2 and alpha with α > 1
have f′ = +∞ there, so such a run must say which penalty it wants, at start-up, in one line naming the key.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fdpg_scale.errors import ConfigError
from fdpg_scale.training.config import load_config

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
DISTRIBUTIONAL = Path(__file__).resolve().parents[2] / "configs" / "task-distributional.yaml"


@pytest.mark.parametrize("overrides", [["divergence.name=rkl"], ["divergence.name=rchi2"],
                                       ["divergence.name=alpha", "divergence.alpha=2.0"]], ids=str)
def test_pointwise_with_unbounded_f_prime_needs_the_key(overrides):
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, overrides)
    message = str(err.value)
    assert "\n" not in message and message.startswith("divergence.outside_support_reward is required"), message
    cfg = load_config(SMOKE, [*overrides, "divergence.outside_support_reward=-20"])
    assert cfg.divergence.outside_support_reward == -20.0 and cfg.target.kind == "pointwise"


@pytest.mark.parametrize("overrides", [["divergence.name=kl"], ["divergence.name=js"], ["divergence.name=tv"],
                                       ["divergence.name=chi2"], ["divergence.name=hellinger"],
                                       ["divergence.name=alpha", "divergence.alpha=0.5"]], ids=str)
def test_finite_limit_divergences_need_nothing(overrides):
    cfg = load_config(SMOKE, overrides)
    assert cfg.divergence.outside_support_reward is None and not cfg.divergence.unbounded_outside_support()


def test_targets_without_zeros_need_nothing():
    """P = a·exp(λφ) is positive everywhere: rkl on a distributional target starts without the key."""
    cfg = load_config(DISTRIBUTIONAL, ["divergence.name=rkl"])
    assert cfg.divergence.unbounded_outside_support() and cfg.target.kind == "distributional"


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_key_must_be_finite(value):
    with pytest.raises(ConfigError, match=r"divergence.outside_support_reward.? must be a (finite float or null|number)"):
        load_config(SMOKE, ["divergence.name=rkl", f"divergence.outside_support_reward={value}"])
