"""benchmarks/gpu_check.py (what scripts/gpu_check.sh runs on a GPU), every section's code on CPU, tiny shapes.

Figures on CPU say nothing about a GPU; this checks that the one prepared command runs end to end and
writes a JSON and a table that hold what each section promises, so that a session with a GPU only has to
run it. The compiled-kernel section is skipped here by design (it needs CUDA).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_runs_every_section_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--device", "cpu", "--tiny",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=880)
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:],
                                  {k: v.get("error") for k, v in sections.items()})
    assert list(sections) == ["compiled_tests", "large_index", "bench", "dw_repeat", "hf_vs_fused", "smoke_train"]
    assert sections["compiled_tests"]["status"] == "skipped"
    for row in sections["large_index"]["rows"]:
        assert row["ok"] and row["logprob_max_abs_err"] < 1e-4 and row["over_2^31"] == []
    assert {r["path"] for r in sections["bench"]["results"]["results"]} >= {"naive", "torch"}
    assert sections["dw_repeat"]["repeats"] == 3 and sections["dw_repeat"]["max_rel_diff"] < 1e-5
    hf = sections["hf_vs_fused"]
    assert hf["fused"]["token_max_abs_err"] < 1e-4 and hf["hf_bf16"]["token_max_abs_err"] > 0
    train = sections["smoke_train"]
    assert train["steps"] == 2 and train["tokens_per_s_median"] > 0
    table = out.with_suffix(".md").read_text()
    assert table.startswith("| section | status |") and table.count("\n") == 2 + len(sections)
