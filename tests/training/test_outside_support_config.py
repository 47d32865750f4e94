"""The config side of the outside-support rule: ``divergence.outside_support_reward``.

A pointwise target (P = a·b, b ∈ {0, 1}) puts samples outside the support; rkl, rchi2 and alpha with α > 1
have f′ = +∞ there, so such a run must say which penalty it wants, at start-up, in one line naming the key.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fdpg_scale.errors import ConfigError
from fdpg_scale.training.config import load_config


@pytest.fixture
def pointwise(tmp_path) -> Path:
    """A config of its own (the shipped ones may set the key): a pointwise target, divergence js."""
    path = tmp_path / "pointwise.yaml"
    path.write_text("model:\n  path: unused\ndivergence:\n  name: js\n"
                    "target:\n  kind: pointwise\n  scorer: contains\n  scorer_args: {substring: def}\n")
    return path


@pytest.mark.parametrize("overrides", [["divergence.name=rkl"], ["divergence.name=rchi2"],
                                       ["divergence.name=alpha", "divergence.alpha=2.0"]], ids=str)
def test_pointwise_with_unbounded_f_prime_needs_the_key(pointwise, overrides):
    with pytest.raises(ConfigError) as err:
        load_config(pointwise, overrides)
    message = str(err.value)
    assert "\n" not in message and message.startswith("divergence.outside_support_reward is required"), message
    cfg = load_config(pointwise, [*overrides, "divergence.outside_support_reward=-20"])
    assert cfg.divergence.outside_support_reward == -20.0 and cfg.target.kind == "pointwise"


@pytest.mark.parametrize("overrides", [["divergence.name=kl"], ["divergence.name=js"], ["divergence.name=tv"],
                                       ["divergence.name=chi2"], ["divergence.name=hellinger"],
                                       ["divergence.name=alpha", "divergence.alpha=0.5"]], ids=str)
def test_finite_limit_divergences_need_nothing(pointwise, overrides):
    cfg = load_config(pointwise, overrides)
    assert cfg.divergence.outside_support_reward is None and not cfg.divergence.unbounded_outside_support()


@pytest.mark.parametrize("target", [["target.kind=distributional", "target.moment=0.5"], ["target.kind=reward"]],
                         ids=str)
def test_targets_without_zeros_need_nothing(pointwise, target):
    """P = a·exp(λφ) or a·exp(r/β) is positive everywhere: rkl there starts without the key."""
    cfg = load_config(pointwise, ["divergence.name=rkl", *target])
    assert cfg.divergence.unbounded_outside_support() and cfg.target.kind != "pointwise"


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_key_must_be_finite(pointwise, value):
    with pytest.raises(ConfigError, match=r"divergence.outside_support_reward.? must be a (finite float or null|number)"):
        load_config(pointwise, ["divergence.name=rkl", f"divergence.outside_support_reward={value}"])
