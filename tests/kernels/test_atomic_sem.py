"""The memory-ordering switch of the fused backward's atomic adds (LinearLogprobsParams.atomic_sem).

"relaxed" must give the same gradients as Triton's default "acq_rel" (interpreter), must reach the compiled
kernel (the PTX for an H100, built here without a GPU), and FDPG_TRITON_ATOMICS must be read once, checked
and logged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fdpg_scale.kernels.linear_logprobs import (ATOMIC_SEMS, DEFAULT_ATOMIC_SEM, LinearLogprobsParams,
                                                 LinearLogprobsTriton, _linear_fwd_kernel)
from fdpg_scale.kernels._triton_utils import is_interpreted
from tests.helpers import assert_close
from tests.kernels.helpers import grads, make_linear_case

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FDPG_TRITON_ATOMICS")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def test_default_is_unchanged_until_measured():
    assert "FDPG_TRITON_ATOMICS" not in os.environ
    assert DEFAULT_ATOMIC_SEM == "acq_rel" == LinearLogprobsParams().atomic_sem
    assert ATOMIC_SEMS == ("acq_rel", "relaxed")
    with pytest.raises(ValueError, match="atomic_sem must be one of"):
        LinearLogprobsParams(atomic_sem="seq_cst")


@pytest.mark.skipif(not is_interpreted(_linear_fwd_kernel), reason="needs TRITON_INTERPRET=1 at import")
def test_relaxed_and_acq_rel_give_the_same_gradients():
    hidden, weight, bias, targets, grad = make_linear_case(lead=(45,), hd=67, vocab=1031)
    results = {}
    for sem in ATOMIC_SEMS:
        params = LinearLogprobsParams(temperature=0.8, atomic_sem=sem)
        out = LinearLogprobsTriton.apply(hidden, weight, bias, targets, params)
        results[sem] = [out.detach(), *grads(out, (hidden, weight, bias), grad)]
    for name, a, r in zip(("out", "d hidden", "d weight", "d bias"), results["acq_rel"], results["relaxed"]):
        assert torch.isfinite(a).all()
        assert_close(r, a, name=name)


@pytest.mark.parametrize("sem", ATOMIC_SEMS)
def test_the_switch_reaches_the_ptx_for_an_h100(sem):
    # Built by Triton's own compiler for sm_90 (no GPU needed to compile); TRITON_INTERPRET must be unset.
    run = subprocess.run([sys.executable, str(ROOT / "tests/kernels/compile_for_gpu.py"), "linear_bwd",
                          f"ATOMIC_SEM={sem}", "DOT=bf16", "CAPABILITY=90"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    atomics = json.loads(run.stdout.strip().splitlines()[-1])["atomics"]
    assert atomics and all(f".{sem}." in a for a in atomics), atomics


@pytest.mark.parametrize("value, ok", [("relaxed", True), ("acq_rel", True), ("fast", False)])
def test_environment_switch_is_checked_and_logged(value, ok):
    code = ("from fdpg_scale.kernels.linear_logprobs import LinearLogprobsParams as P; "
            "print('sem', P().atomic_sem)")
    run = subprocess.run([sys.executable, "-c", code], env=_env(TRITON_INTERPRET="1", FDPG_TRITON_ATOMICS=value),
                         capture_output=True, text=True, timeout=300)
    if ok:
        assert run.returncode == 0, run.stderr[-2000:]
        assert f"sem {value}" in run.stdout
        assert f"FDPG_TRITON_ATOMICS={value}" in run.stderr  # logged, not silent
    else:
        assert run.returncode != 0
        assert "FDPG_TRITON_ATOMICS='fast': must be one of ('acq_rel', 'relaxed')" in run.stderr
