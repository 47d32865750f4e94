"""The chaos soak (scripts/chaos_soak.py), short: a 2-rank run of 30 steps with a checkpoint every 2, hit by 5
faults at seeded random moments (every kind at least once: kill -9 of a rank, kill -9 of torchrun, USR1 to the
job, TERM to torchrun; a kill sometimes tears the last metrics line), restarted with resume after each. Every
step's loss, log Z, baseline and proposal version equal an uninterrupted run's (1e-6), and metrics.jsonl holds
each step once, in order, every line whole. The longer soak's figures are in docs/reliability.md."""

from __future__ import annotations

import pytest

from tests.harness import load_script

chaos = load_script("scripts/chaos_soak.py")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(1200)
def test_a_run_hit_by_five_random_faults_equals_the_uninterrupted_run(tiny_gpt2, tmp_path):
    report = chaos.soak(tmp_path, steps=30, faults=5, seed=0, model=tiny_gpt2)
    assert report["faults_injected"] == 5 and all(n >= 1 for n in report["faults_by_kind"].values()), report
    assert report["launches"] == 6 and report["resumes"] >= 4, report
    assert report["steps_compared"] == 30 and report["mismatches"] == [], report["mismatches"]
    # the checked file itself: each step once, in order, whole lines (read_metrics raises on a torn one)
    rows = chaos.read_metrics(tmp_path / "chaos" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 31))


def test_the_comparison_catches_a_difference_a_missing_step_and_a_torn_line(tmp_path):
    """The soak's own checks can fail: what they must catch, on hand-made rows."""
    ref = [{"step": s, "loss": 0.5 * s, "log_z": -1.0, "baseline": 0.1, "proposal_version": 1} for s in (1, 2, 3)]
    assert chaos.compare(ref, [dict(r) for r in ref], 1e-6) == []
    off = [dict(r) for r in ref]
    off[1]["log_z"] += 1e-5
    assert chaos.compare(ref, off, 1e-6) == ["step 2 log_z: -0.99999 after faults, -1.0 uninterrupted"]
    assert chaos.compare(ref, [ref[0], ref[2], ref[2]], 1e-6)[0].startswith("steps [1, 3, 3]")
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    (tmp_path / "checkpoints" / "step_00000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000002" / "meta.json").write_text("{}")
    assert not chaos.tear_last_line(path)   # step 2 has a checkpoint: a kill cannot have cut its line
    (tmp_path / "checkpoints" / "step_00000002" / "meta.json").unlink()
    assert chaos.tear_last_line(path) and chaos.last_step(path) == 1
    with pytest.raises(AssertionError, match="the last line is not whole"):
        chaos.read_metrics(path)
