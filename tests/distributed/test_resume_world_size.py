"""Resume on another world size: 1 → 2 and 2 → 1 ranks, against the uninterrupted 1-rank run.

The global batch, its per-chunk sampling seeds, log Z, the baseline and the proposal schedule do not depend
on the world size, and 1 and 2 ranks agree to ~1e-6 per step (tests/training/test_train_e2e.py), so a run that
changes world size at step 2 must log the same losses as the straight run and end with the same weights
(Adam moments and the LR schedule carried over through DeepSpeed's universal checkpoint, the proposal
re-partitioned). Five real `fdpg-scale train` runs (1- and 2-rank), the independent ones side by side.
"""

from __future__ import annotations

import pytest

from tests.harness import assert_params_close, export, metrics, run_train, side_by_side

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
STEPS = ("train.steps=4", "train.save_every=2", "logging.tensorboard=false")


def _same_losses(a: list[dict], b: list[dict]) -> None:
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("loss", "log_z", "kl_p_pi", "proposal_version"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key, x[key], y[key])


def test_resume_from_one_rank_on_two_and_from_two_on_one(tiny_gpt2, tmp_path):
    straight, one_two, two_one = tmp_path / "straight", tmp_path / "1to2", tmp_path / "2to1"
    # Independent runs go side by side (three processes on two cores instead of one rank idling a core).
    side_by_side(lambda: run_train(straight, *STEPS, model=tiny_gpt2, nproc=1),
                 lambda: run_train(one_two, "train.steps=2", *STEPS[1:], model=tiny_gpt2, nproc=1),
                 lambda: run_train(two_one, "train.steps=2", *STEPS[1:], model=tiny_gpt2, nproc=2))
    logs = side_by_side(lambda: run_train(one_two, *STEPS, model=tiny_gpt2, nproc=2),
                        lambda: run_train(two_one, *STEPS, model=tiny_gpt2, nproc=1))
    p_straight, *p_moved = side_by_side(lambda: export(straight, tmp_path / "hf_straight"),
                                        lambda: export(one_two, tmp_path / "hf_1to2"),
                                        lambda: export(two_one, tmp_path / "hf_2to1"))
    for out, log, second, params in zip((one_two, two_one), logs, (2, 1), p_moved):
        assert f"world {second}" in log and "resumed at step 2" in log, log[-3000:]
        _same_losses(metrics(out), metrics(straight))
        assert_params_close(params, p_straight, rtol=1e-5)
