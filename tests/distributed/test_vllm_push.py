"""The grouped vLLM weight push: groups never above the limit, streamed, and the engine's weights equal what
was pushed (one engine start, ~1 min on 2 CPU cores)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fdpg_scale.distributed.vllm_engine import PUSH_GROUP_BYTES, push_groups

ROOT = Path(__file__).resolve().parents[2]


def test_groups_respect_the_limit_keep_order_and_convert():
    sizes = [10, 300, 7, 7, 1000, 3, 250, 250, 1]  # elements; bf16 = 2 bytes each
    named = [(f"t{i}", torch.full((n,), float(i))) for i, n in enumerate(sizes)]
    groups = list(push_groups(iter(named), dtype=torch.bfloat16, limit_bytes=600))
    flat = [item for g in groups for item in g]
    assert [n for n, _ in flat] == [n for n, _ in named]
    for g in groups:
        nbytes = sum(t.numel() * t.element_size() for _, t in g)
        assert nbytes <= 600 or len(g) == 1, (nbytes, [n for n, _ in g])  # only a lone oversized tensor exceeds
    assert [len(g) for g in groups if sum(t.numel() * 2 for _, t in g) > 600] == [1]  # the 1000-element one
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for _, t in flat)
    assert all(torch.equal(t, src.to(torch.bfloat16)) for (_, t), (_, src) in zip(flat, named))
    assert PUSH_GROUP_BYTES == 2**30


def test_groups_stream_and_copy_shared_tensors():
    consumed = []
    shared = torch.randn(64)

    def source():
        for i in range(6):
            consumed.append(i)
            yield f"t{i}", shared  # the same storage every time (a tied head listed twice)

    it = push_groups(source(), dtype=torch.float32, limit_bytes=2 * 64 * 4)
    first = next(it)
    assert len(first) == 2 and consumed == [0, 1, 2]  # the third tensor closed the first group: no look-ahead
    assert first[0][1].data_ptr() != shared.data_ptr() != first[1][1].data_ptr()
    shared.add_(1.0)  # the source changes after the copy (a ZeRO-3 shard released): the group keeps its values
    assert not torch.equal(first[0][1], shared)
    with pytest.raises(ValueError, match="limit_bytes"):
        next(push_groups(iter([]), dtype=torch.float32, limit_bytes=0))


@pytest.mark.slow
def test_push_in_small_groups_reaches_every_parameter(tmp_path):
    pytest.importorskip("vllm", reason="the vllm extra is not installed (scripts/setup.sh installs it)")
    from tests.harness import worker_env
    from tests.helpers import vllm_tiny_gpt2

    model = vllm_tiny_gpt2(tmp_path / "gpt2-2heads")
    limit = 100 * 2**10  # above the largest tensor (wte, 96 KiB in fp32): every group within the limit
    run = subprocess.run([sys.executable, str(ROOT / "tests/distributed/workers/vllm_push_worker.py"),
                          str(tmp_path), str(model), str(limit)], env=worker_env(), capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert "lm_head.weight" in res["names"]  # the tied head is sent under its own name
    assert len(res["groups"]) > 3 and max(res["groups"]) <= limit
    assert sum(res["groups"]) == res["sent_bytes"]  # fp32 engine: pushed in fp32
    # every engine parameter was replaced: Σw² scaled by 1.5² (invariant to vLLM fusing/transposing tensors)
    assert res["before"].keys() == res["after"].keys()
    for name, s0 in res["before"].items():
        if s0 > 0:
            assert res["after"][name] == pytest.approx(2.25 * s0, rel=1e-5), name
