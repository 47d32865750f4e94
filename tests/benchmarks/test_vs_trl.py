"""benchmarks/vs_trl.py's bookkeeping, without TRL or a training run: which steps are timed, how tokens/s and the
ratio are formed, and the fdpg-scale command it builds from the demo config (the runs themselves need the TRL
environment and minutes of CPU; `python benchmarks/vs_trl.py` makes them)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vs_trl():
    spec = importlib.util.spec_from_file_location("vs_trl", REPO / "benchmarks/vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_first_two_steps_are_not_timed(vs_trl):
    s = vs_trl._summary([9.0, 5.0, 1.0, 3.0, 2.0], [10, 10, 100, 300, 200], rss_kib=2048)
    assert s["median_s"] == 2.0 and s["mean_s"] == 2.0
    assert s["tokens_per_s"] == pytest.approx(600 / 6.0) and s["peak_rss_mib"] == 2.0
    with pytest.raises(RuntimeError, match="2 steps recorded"):
        vs_trl._summary([1.0, 1.0], [1, 1], rss_kib=1)


def test_the_fdpg_side_runs_the_demo_config_with_one_micro_batch_per_rank(vs_trl, tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, *, env, log):
        seen.update(cmd=cmd, env=env)
        rows = [{"step_wall_s": t, "tokens": 768.0} for t in (3.0, 2.0, 0.5, 0.25, 0.75)]
        (tmp_path / "fdpg").mkdir()
        (tmp_path / "fdpg" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        return 4096

    monkeypatch.setattr(vs_trl, "_timed", fake_run)
    res = vs_trl.run_fdpg(Path("/models/m"), world=2, batch=32, steps=5, max_new_tokens=24, threads=2,
                          wait_policy="passive", work=tmp_path)
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc_per_node=2" in cmd
    assert str(REPO / "configs" / "demo.yaml") in cmd
    for override in ("train.global_batch=32", "train.micro_batch=16", "sampling.batch=16", "train.steps=5",
                     "sampling.max_new_tokens=24", "model.path=/models/m"):
        assert override in cmd
    assert seen["env"]["OMP_NUM_THREADS"] == "1" and seen["env"]["OMP_WAIT_POLICY"] == "passive"
    assert res["median_s"] == 0.5 and res["tokens_per_s"] == pytest.approx(3 * 768 / 1.5)


def test_the_table_gives_the_ratio_of_medians(vs_trl):
    side = {"median_s": 0.5, "mean_s": 0.6, "tokens_per_s": 1000.0, "peak_rss_mib": 700.0}
    row = {"label": "1M", "world": 1, "batch": 32, "trl": dict(side, median_s=1.0), "fdpg": side,
           "ratio_median": 0.5}
    text = vs_trl.table([row])
    assert text.splitlines()[2] == "| 1M | 1 | 32 | 1.000 / 0.600 | 0.500 / 0.600 | 0.50 | 1000 / 1000 | 700 / 700 |"
