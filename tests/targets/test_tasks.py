"""The tasks named in configs: each scorer gives the value it should on hand-made samples."""

import math

import pytest
import torch

from fdpg_scale.training.config import ConfigError, TargetConfig
from fdpg_scale.targets.samples import Samples
from fdpg_scale.targets.tasks import build_task

TEXTS = ["def f(x):\n    return x\n", "x = (1,", "", "print('def')  # def", "   \n"]


def samples(texts=TEXTS) -> Samples:
    n = len(texts)
    return Samples(token_ids=torch.zeros(n, 2, dtype=torch.long), mask=torch.ones(n, 2, dtype=torch.bool),
                   texts=list(texts))


def test_pointwise_parses_as_python():
    task = build_task(TargetConfig(kind="pointwise", scorer="parses_as_python"))
    assert task.feature(samples()).tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert task.target.log_scores(samples()).tolist() == [0.0, -math.inf, -math.inf, 0.0, -math.inf]


def test_pointwise_contains_and_reward_count():
    task = build_task(TargetConfig(kind="pointwise", scorer="contains", scorer_args={"substring": "def"}))
    assert task.feature(samples()).tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    task = build_task(TargetConfig(kind="reward", scorer="count", scorer_args={"substring": "def"}, beta=0.5))
    assert task.feature(samples()).tolist() == [1.0, 0.0, 0.0, 2.0, 0.0]
    assert task.target.log_scores(samples()).tolist() == [2.0, 0.0, 0.0, 4.0, 0.0]   # r/β


def test_distributional_feature_and_lambda():
    task = build_task(TargetConfig(kind="distributional", scorer="contains", scorer_args={"substring": "def"},
                                   moment=0.5))
    assert task.moment == 0.5
    assert task.target.log_scores(samples()).tolist() == [0.0] * 5                   # λ = 0 before the fit
    fitted = task.with_lambdas([1.5])
    assert fitted.target.log_scores(samples()).tolist() == [1.5, 0.0, 0.0, 1.5, 0.0]  # λ·φ


def test_bad_scorer_and_arguments_are_named():
    with pytest.raises(ConfigError, match="target.scorer 'nope' is unknown"):
        build_task(TargetConfig(scorer="nope"))
    with pytest.raises(ConfigError, match=r"target.scorer_args for 'contains' must be exactly \['substring'\]"):
        build_task(TargetConfig(scorer="contains", scorer_args={}))
