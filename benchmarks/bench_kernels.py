"""Time and peak extra memory of per-token log-probs through a linear head, path by path.

    python benchmarks/bench_kernels.py --out bench.json            # full grid on this machine's device
    python benchmarks/bench_kernels.py --quick --out quick.json    # small smoke grid
    python benchmarks/bench_kernels.py --shape 4096,768,50257 --dtype fp32 --out kernels.json

Paths (each (shape, dtype, path, mode) runs in its OWN subprocess, so one path's memory never shows in
another's peak):
  naive     torch.log_softmax((h @ W.T).float(), -1).gather(-1, t)     (materialises [N, V] twice)
  torch     fdpg_scale.kernels.linear_token_logprobs(impl="torch")       (the chunked reference)
  triton    linear_token_logprobs(impl="triton")                         (CUDA only)
  cce       cut_cross_entropy.linear_cross_entropy(reduction="none"), negated; impl="torch_compile" on
            CPU, "cce" on CUDA (when the package is installed)
  liger     liger_kernel LigerFusedLinearCrossEntropyLoss(reduction="none"), negated (CUDA only, when
            installed; timed with our per-token upstream gradient, its gradient values are not checked)
Modes: "fwd" (no autograd graph: the inputs do not require grad) and "fwd+bwd" ((out·g).sum().backward()
with a random g [N] and grads for hidden and weight).

Matmul rate (--no-rate turns it off): per (shape, dtype), a worker also times one plain h @ W.T in that
dtype ("gemm", warm-up excluded, same reps and rounds) as the device's measured matmul rate 2·N·H·V / t.
Each row then gets "rate/gemm": its useful FLOPs (2·N·H·V forward, 6·N·H·V forward+backward, whatever the
path really computes) per second over that rate. The GPU goal is rate/gemm ≥ 0.5 for fwd+bwd (benchmarks/README.md).

Measurement, per worker: one warm-up call (compilation, autotuning, first touch) is excluded; then
--reps timed calls (min and median reported; the ratios to naive use the min, the figure least disturbed
by other processes on a shared CPU), then one more call for memory, measured alone:
  CPU : VmHWM − VmRSS before the call, after resetting VmHWM by writing "5" to /proc/self/clear_refs
        (the kernel's own resident-set high-water mark: no tracing overhead) and after malloc_trim(0), so
        that heap pages glibc kept from earlier calls are not hidden in the "before" figure;
  CUDA: torch.cuda.max_memory_allocated() − memory_allocated() before the call.
The extra memory of fwd+bwd includes the gradients themselves ([V, H] and [N, H] in fp32 or the input
dtype), which every path must produce.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

from _cpu_peak_memory import cpu_peak_since, start_cpu_peak  # this folder (the script's sys.path[0])

PATHS = ("naive", "torch", "triton", "cce", "liger")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
FULL_GRID = [(1024, 768, 50257), (4096, 768, 50257), (4096, 2048, 128256), (8192, 4096, 128256),
             (16384, 4096, 128256)]
QUICK_GRID = [(256, 64, 5003), (512, 128, 20011)]
CPU_FULL_GRID = [(1024, 768, 50257), (4096, 768, 50257)]


# ----------------------------------------------------------------------------------------------------------
# Worker: one path, one shape, one dtype, one mode, in a fresh process
# ----------------------------------------------------------------------------------------------------------

def _build_op(path: str, device: str):
    """-> f(hidden [N, H], weight [V, H], targets [N]) -> log-probs [N] (float32)."""
    import torch

    if path == "gemm":  # the matmul-rate reference, not a log-prob path
        return lambda h, w, t: h @ w.T
    if path == "naive":
        return lambda h, w, t: torch.log_softmax((h @ w.T).float(), -1).gather(-1, t[:, None]).squeeze(-1)
    if path in ("torch", "triton"):
        from fdpg_scale.kernels import linear_token_logprobs
        return lambda h, w, t: linear_token_logprobs(h, w, t, impl=path)
    if path == "cce":
        from cut_cross_entropy import linear_cross_entropy
        impl = "cce" if device == "cuda" else "torch_compile"
        return lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none", impl=impl)
    if path == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
        return lambda h, w, t: -loss(w, h, t)
    raise ValueError(f"unknown path {path!r}")


def run_worker(args) -> dict:
    import torch

    dev = args.device
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, DTYPES[args.dtype])
    n, hd, v = args.n, args.h, args.v
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(n, hd, generator=gen) * 0.5).to(dtype).to(dev)
    weight = (torch.randn(v, hd, generator=gen) / hd ** 0.5).to(dtype).to(dev)
    targets = torch.randint(0, v, (n,), generator=gen).to(dev)
    grad = torch.randn(n, generator=gen).to(dev)
    backward = args.mode == "fwd+bwd"
    hidden.requires_grad_(backward)
    weight.requires_grad_(backward)
    op = _build_op(args.path, dev)
    cuda = dev == "cuda"

    def call():
        if backward:
            out = op(hidden, weight, targets)
            (out.float() * grad).sum().backward()
            hidden.grad = None
            weight.grad = None
        else:
            with torch.no_grad():
                out = op(hidden, weight, targets)
        return out

    out = call()  # warm-up: compile / autotune / first touch
    checksum = float(out.detach().float().sum())
    del out
    times = []
    for _ in range(args.reps):  # time: the process as a user runs it (allocator caches warm)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = call()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del out
    # memory: one more call, measured alone
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = start_cpu_peak()
        out = call()
        peak = cpu_peak_since(before)
    del out
    return {"time_s": statistics.median(times), "time_min_s": min(times), "times_s": times, "peak_extra_bytes": peak,
            "checksum": checksum, "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------

def available(path: str, device: str) -> str | None:
    """None when the path can run here, else the reason it is skipped."""
    if path == "triton" and device != "cuda":
        return "CUDA only (the interpreter is a test tool, not a CPU path)"
    if path == "liger" and device != "cuda":
        return "CUDA only"
    pkg = {"cce": "cut_cross_entropy", "liger": "liger_kernel"}.get(path)
    if pkg and importlib.util.find_spec(pkg) is None:
        return f"{pkg} not installed"
    return None


def spawn(path, n, hd, v, dtype, mode, device, reps, threads, timeout) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--path", path, "--n", str(n), "--h", str(hd),
           "--v", str(v), "--dtype", dtype, "--mode", mode, "--device", device, "--reps", str(reps),
           "--threads", str(threads)]
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["exit %d" % res.returncode])[-1][:300]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="small smoke grid")
    p.add_argument("--shape", action="append", default=[], help="N,H,V (repeatable); replaces the grid")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable; default fp32 (+bf16 on CUDA)")
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ",".join(PATHS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--reps", type=int, default=3, help="timed calls per worker")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every path's worker this many times, interleaved (path A, B, C, A, B, C, ...); "
                        "times are pooled, memory is the largest seen: robust to bursts of load on a shared CPU")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in the workers (0: torch's default)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per worker")
    p.add_argument("--no-rate", dest="rate", action="store_false",
                   help="skip the plain-matmul reference and the rate/gemm column")
    # worker-only arguments
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--h", type=int, help=argparse.SUPPRESS)
    p.add_argument("--v", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        args.dtype = args.dtype[0] if isinstance(args.dtype, list) else args.dtype
        print(json.dumps(run_worker(args)))
        return 0

    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.shape:
        grid = [tuple(int(x) for x in s.split(",")) for s in args.shape]
    elif args.quick:
        grid = QUICK_GRID
    else:
        grid = FULL_GRID if device == "cuda" else CPU_FULL_GRID
    dtypes = args.dtype or (["fp32", "bf16"] if device == "cuda" else ["fp32"])
    paths = [x for x in args.paths.split(",") if x]
    modes = [x for x in args.modes.split(",") if x]
    for x in paths:
        if x not in PATHS:
            p.error(f"--paths: unknown path {x!r} (choose from {', '.join(PATHS)})")
    for x in modes:
        if x not in MODES:
            p.error(f"--modes: unknown mode {x!r} (choose from {', '.join(MODES)})")

    def merge(prev: dict | None, r: dict) -> dict:
        """Pool one more worker's result into prev: times joined, memory the largest seen, errors kept."""
        if prev is None or "error" in r or "error" in prev:
            return r if prev is None or "error" in r else prev
        times = prev["times_s"] + r["times_s"]
        prev.update(times_s=times, time_s=statistics.median(times), time_min_s=min(times),
                    peak_extra_bytes=max(prev["peak_extra_bytes"], r["peak_extra_bytes"]))
        return prev

    rows = []
    print(f"device={device} reps={args.reps} rounds={args.rounds} (t/naive from min times; peak extra memory "
          f"from one further call; rate/gemm: useful FLOP/s over one plain h·Wᵀ's)")
    header = f"{'N':>6} {'H':>5} {'V':>7} {'dtype':>5} {'mode':>8} {'path':>7} {'min s':>8} {'median s':>9} " \
             f"{'extra MB':>10} {'t/naive':>8} {'mem/naive':>9} {'rate/gemm':>9}"
    print(header)
    for (n, hd, v) in grid:
        for dtype in dtypes:
            gemm_tflops = None
            for mode in modes:
                reasons = {path: available(path, device) for path in paths}
                results = {path: {"skipped": reasons[path]} if reasons[path] else None for path in paths}
                runnable = [path for path in paths if not reasons[path]]
                # The matmul reference joins the first mode's rounds (it is timed without autograd).
                with_gemm = args.rate and mode == modes[0]
                for _ in range(args.rounds):  # interleaved: A, B, C, A, B, C (robust to bursts of load)
                    for path in (["gemm"] if with_gemm else []) + runnable:
                        r = spawn(path, n, hd, v, dtype, "fwd" if path == "gemm" else mode, device, args.reps,
                                  args.threads, args.timeout)
                        results[path] = merge(results.get(path), r)
                if with_gemm:
                    gemm = results.pop("gemm")
                    if "time_min_s" in gemm:
                        gemm_tflops = 2 * n * hd * v / gemm["time_min_s"] / 1e12
                        rows.append({"N": n, "H": hd, "V": v, "dtype": dtype, "mode": "fwd", "path": "gemm",
                                     "device": device, **gemm, "tflops": gemm_tflops})
                        print(f"{n:>6} {hd:>5} {v:>7} {dtype:>5} {'h·Wᵀ':>8} {'gemm':>7} {gemm['time_min_s']:8.3f} "
                              f"{gemm['time_s']:9.3f}   {gemm_tflops:.3f} TFLOP/s: the rate/gemm reference",
                              flush=True)
                    else:
                        print(f"{n:>6} {hd:>5} {v:>7} {dtype:>5} gemm reference ERROR: {gemm['error']}", flush=True)
                naive = results.get("naive") if results.get("naive") and "time_s" in results["naive"] else None
                for path in paths:
                    row = {"N": n, "H": hd, "V": v, "dtype": dtype, "mode": mode, "path": path, "device": device,
                           **results[path]}
                    if "time_s" in row and naive is not None:
                        row["time_vs_naive"] = row["time_min_s"] / naive["time_min_s"]
                        row["mem_vs_naive"] = row["peak_extra_bytes"] / max(naive["peak_extra_bytes"], 1)
                    if "time_s" in row and gemm_tflops:
                        flops = (2 if mode == "fwd" else 6) * n * hd * v
                        row["tflops"] = flops / row["time_min_s"] / 1e12
                        row["rate_vs_gemm"] = row["tflops"] / gemm_tflops
                    rows.append(row)
                    if "time_s" in row:
                        rel = (f"{row['time_vs_naive']:8.3f} {row['mem_vs_naive']:9.3f}"
                               if "time_vs_naive" in row else f"{'':8} {'':9}")
                        rate = f"{row['rate_vs_gemm']:9.3f}" if "rate_vs_gemm" in row else f"{'':9}"
                        print(f"{n:>6} {hd:>5} {v:>7} {dtype:>5} {mode:>8} {path:>7} {row['time_min_s']:8.3f} "
                              f"{row['time_s']:9.3f} {row['peak_extra_bytes'] / 2**20:10.1f} {rel} {rate}", flush=True)
                    else:
                        print(f"{n:>6} {hd:>5} {v:>7} {dtype:>5} {mode:>8} {path:>7}   "
                              f"{row.get('skipped') and 'skipped: ' + row['skipped'] or 'ERROR: ' + row['error']}",
                              flush=True)
    if args.out:
        meta = {"device": device, "reps": args.reps, "rounds": args.rounds, "threads": args.threads, "torch": torch.__version__, "python": sys.version.split()[0],
                "cpu_count": os.cpu_count()}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
