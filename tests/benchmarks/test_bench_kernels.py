"""Smoke test of benchmarks/bench_kernels.py on its --quick grid, naive and torch paths, CPU.

Checks the JSON rather than speed (timings on a shared CPU are noise): every (shape, mode, path) row
present, each summary recomputed from the row's own raw timings, the ratios recomputed from the raw
numbers of both rows, the plain-matmul reference and each row's rate/gemm present, the two paths computing
the same log-probs (checksums, and a sum of the size −N·log V that a near-uniform softmax must give) so
that the benchmark can never time a wrong answer, and the memory meter measuring something real: naive's
peak at least its fp32 [N, V] logits, the chunked torch path's below naive's (below half on the larger
shape, where the logits are 41 MB; measured 0.21-0.22×). ~3 min on 2 busy cores.
"""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICK = [(256, 64, 5003), (512, 128, 20011)]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_kernels_quick(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_kernels.py"), "--quick", "--device", "cpu",
                           "--paths", "naive,torch", "--reps", "1", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=290)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["meta"]["device"] == "cpu" and res["meta"]["reps"] == 1
    rows = {(r["N"], r["H"], r["V"], r["mode"], r["path"]): r for r in res["results"]}
    assert len(rows) == len(res["results"]) == len(QUICK) * 5  # gemm + 2 modes × 2 paths per shape
    for n, hd, v in QUICK:
        gemm = rows[(n, hd, v, "fwd", "gemm")]
        assert gemm["time_min_s"] > 0 and gemm["tflops"] == pytest.approx(2 * n * hd * v / gemm["time_min_s"] / 1e12)
        for mode in ("fwd", "fwd+bwd"):
            naive, torch_path = rows[(n, hd, v, mode, "naive")], rows[(n, hd, v, mode, "torch")]
            for r in (naive, torch_path):
                assert "error" not in r and len(r["times_s"]) == 1 and r["time_min_s"] > 0, r
                assert r["time_min_s"] == min(r["times_s"]) and r["time_s"] == statistics.median(r["times_s"]), r
                flops = (2 if mode == "fwd" else 6) * n * hd * v
                assert r["rate_vs_gemm"] == pytest.approx(flops / r["time_min_s"] / 1e12 / gemm["tflops"])
                # Σ log-probs of N random targets under a near-uniform softmax: a little below −N·log V
                # (log-sum-exp ≥ log V + the mean logit); a kernel that dropped the picked logit or the
                # temperature would leave this band or the naive/torch agreement below.
                assert -1.1 * n * math.log(v) < r["checksum"] < -0.99 * n * math.log(v), (mode, r["checksum"])
            assert torch_path["time_vs_naive"] == pytest.approx(torch_path["time_min_s"] / naive["time_min_s"])
            assert torch_path["mem_vs_naive"] == pytest.approx(torch_path["peak_extra_bytes"] /
                                                               naive["peak_extra_bytes"])
            # Σ log-probs over N tokens (each ≈ −log V): fp32 sums in different orders agree to ~1e-6.
            assert torch_path["checksum"] == pytest.approx(naive["checksum"], rel=1e-5), mode
            # The meter sees naive's [N, V] fp32 logits, and the chunked path never holds them whole.
            assert naive["peak_extra_bytes"] >= 4 * n * v, (mode, naive["peak_extra_bytes"])
            assert torch_path["peak_extra_bytes"] < naive["peak_extra_bytes"], mode
            if v == max(q[2] for q in QUICK):
                assert torch_path["mem_vs_naive"] < 0.5, (mode, torch_path["mem_vs_naive"])
    assert "rate/gemm" in proc.stdout and "TFLOP/s" in proc.stdout
