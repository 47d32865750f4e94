"""NonFiniteGuard (training/nonfinite.py) on stand-in engines and real ``Draws``: which step it skips, when it
stops the run, what it prints, and that every rank takes the same branch (two forked gloo ranks).

The real runs (a NaN scorer, an infinite learning rate, checkpoints checked for NaN) are in
test_nonfinite_runs.py; these tests reach every branch in milliseconds.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fdpg_scale.core.step import Draws
from fdpg_scale.errors import NonFiniteError
from fdpg_scale.training.nonfinite import NonFiniteGuard, weights_finite
from tests.harness import run_ranks


class Policy:
    """What the guard reads of a DeepSpeed engine: ``module.parameters()``, ``skipped_steps``, ``get_lr()``."""

    def __init__(self, weights: torch.Tensor | None = None, lr: float = 1e-3):
        self.module = torch.nn.Linear(2, 2)
        if weights is not None:
            with torch.no_grad():
                self.module.weight.copy_(weights)
        self.skipped_steps = 0
        self.lr = lr

    def get_lr(self) -> list[float]:
        return [self.lr]


def draws(*, logq=(-1.0, -2.0), log_target=(-3.0, -math.inf), log_base=(-1.5, -2.5), problem=None) -> list[Draws]:
    """One micro-batch of two samples (the second outside the target's support: log P = −inf is finite input)."""
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return [Draws(logq=t(logq), log_target=t(log_target), log_base=t(log_base),
                  context_ids=torch.zeros(2, dtype=torch.long), problem=problem)]


def make_guard(mode: str = "skip", max_skips: int = 3, policy: Policy | None = None):
    """A guard over the two ``train`` keys it reads, and the list its messages go to."""
    messages: list[str] = []
    train = SimpleNamespace(on_nonfinite=mode, max_consecutive_skips=max_skips)
    return NonFiniteGuard(train, messages.append, policy or Policy()), messages


def test_finite_samples_pass_and_minus_inf_log_p_is_not_a_problem():
    guard, messages = make_guard()
    assert guard.samples_ok(draws(), step=1)
    assert messages == [] and guard.metrics() == {"nonfinite_skips": 0}


@pytest.mark.parametrize("field, value, named", [
    ("log_target", (float("nan"), -1.0), "the target's log-score is nan"),
    ("logq", (-1.0, math.inf), "log q(x) of the proposal is inf"),
    ("log_base", (float("nan"), -1.0), "log a(x) of the base model is nan"),
])
def test_a_nan_or_plus_inf_sample_skips_the_step_and_names_it(field, value, named):
    guard, messages = make_guard()
    assert not guard.samples_ok(draws(**{field: value}), step=4)
    assert messages == [f"step 4 skipped: its samples are not finite ({named}); 1 skipped so far "
                        f"(train.on_nonfinite: skip)"]
    assert guard.metrics() == {"nonfinite_skips": 1}


def test_a_scorer_s_own_message_is_the_reason():
    guard, messages = make_guard()
    problem = "scorer 'nan_step_1' returned nan for sample 0"
    assert not guard.samples_ok(draws(log_target=(float("nan"), -1.0), problem=problem), step=1)
    assert f"({problem})" in messages[0]


def test_consecutive_skips_stop_the_run_and_a_good_step_resets_the_count():
    guard, _ = make_guard(max_skips=2)
    bad = draws(log_target=(float("nan"), -1.0))
    assert not guard.samples_ok(bad, step=1)
    assert guard.samples_ok(draws(), step=2)             # a finite step in between: the run goes on
    assert not guard.samples_ok(bad, step=3)
    with pytest.raises(NonFiniteError) as info:
        guard.samples_ok(bad, step=4)
    text = str(info.value)
    assert "\n" not in text and text.startswith("step 4: 2 steps in a row had non-finite values")
    assert "train.max_consecutive_skips=2 reached" in text and "the last checkpoint is intact" in text
    assert guard.skips == 3


def test_stop_mode_raises_on_the_first_non_finite_sample():
    guard, messages = make_guard(mode="stop")
    with pytest.raises(NonFiniteError, match=r"^step 2: its samples are not finite \(the target's log-score is nan\); "
                                             r"train.on_nonfinite is 'stop'"):
        guard.samples_ok(draws(log_target=(float("nan"), -1.0)), step=2)
    assert messages == [] and guard.skips == 0


def test_update_ok_passes_a_finite_update():
    guard, messages = make_guard()
    guard.before_update()
    assert guard.update_ok(torch.tensor([-1.0, -2.0]), torch.tensor([0.5, -0.5]), step=1)
    assert messages == []


def test_a_non_finite_weight_or_log_pi_skips_the_rest_of_the_step():
    guard, messages = make_guard()
    guard.before_update()
    assert not guard.update_ok(torch.tensor([-1.0, -2.0]), torch.tensor([0.5, float("nan")]), step=3)
    assert "step 3 skipped: its loss or gradients are not finite (an f-DPG weight is nan)" in messages[0]
    guard.before_update()
    assert not guard.update_ok(torch.tensor([-math.inf, -2.0]), torch.tensor([0.5, 0.1]), step=4)
    assert "(log π(x) is -inf)" in messages[1]


def test_an_update_deepspeed_dropped_is_a_skip_named_by_the_gradient_norm():
    policy = Policy()
    guard, messages = make_guard(policy=policy)
    guard.before_update()
    policy.skipped_steps += 1                               # ZeRO-3 found a non-finite gradient norm
    assert not guard.update_ok(torch.tensor([-1.0]), torch.tensor([0.5]), step=2)
    assert "(the gradient norm is not finite)" in messages[0]


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_non_finite_weights_always_stop_before_anything_is_saved(mode):
    guard, _ = make_guard(mode=mode, policy=Policy(torch.tensor([[1.0, math.inf], [0.0, 1.0]]), lr=math.inf))
    guard.before_update()
    with pytest.raises(NonFiniteError) as info:
        guard.update_ok(torch.tensor([-1.0]), torch.tensor([0.5]), step=1)
    text = str(info.value)
    assert text.startswith("step 1: the policy's weights are not finite after the optimizer step (train.lr=inf)")
    assert "before anything is saved" in text and "\n" not in text


def test_weights_finite_reads_the_zero3_shard_when_there_is_one():
    policy = Policy()
    assert weights_finite(policy)
    policy.module.weight.ds_tensor = torch.tensor([float("nan")])   # ZeRO-3: p itself is an empty placeholder
    assert not weights_finite(policy)
    policy.module.weight.requires_grad_(False)                      # frozen parameters are not checked
    assert weights_finite(policy)


def _two_ranks_samples(rank: int) -> tuple[bool, list[str]]:
    guard, messages = make_guard()
    bad = draws(log_target=(float("nan"), -1.0)) if rank == 1 else draws()
    return guard.samples_ok(bad, step=1), messages


def test_a_nan_on_one_rank_skips_the_step_on_every_rank_with_that_rank_s_reason():
    results = run_ranks(_two_ranks_samples, 2)
    for ok, messages in results:
        assert ok is False
        assert messages == ["step 1 skipped: its samples are not finite (rank 1: the target's log-score is nan); "
                            "1 skipped so far (train.on_nonfinite: skip)"]
