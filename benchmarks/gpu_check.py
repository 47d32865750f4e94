"""The first GPU check of the project, in one call of at most 540 s (``scripts/gpu_check.sh`` runs it).

    python benchmarks/gpu_check.py --out DIR                     # on a CUDA GPU, after the bundle install
    python benchmarks/gpu_check.py --out DIR --dry-run           # the same sections on CPU, tiny shapes
    python benchmarks/gpu_check.py --out DIR --no-gpu            # the one-line verdict and the summary only

Sections, in this order (most important first: a slot that ends early still has the answers that matter),
each in its own process with its own time limit inside the total budget, so a hang or a crash costs that
section only; after EVERY section DIR/summary.json and DIR/summary.md are rewritten:

- ``probe``: versions (Python, torch, CUDA, triton, transformers, deepspeed, accelerate) and the GPU;
- ``smoke_train``: ``fdpg-scale train`` on one GPU, 4 steps, bf16, ZeRO-3, tiny Llama: it runs, finite loss,
  tokens/s (median of the steps after the first);
- ``srun_env``: the SLURM srun mode on one GPU (``SLURM_LOCALID=3``, one GPU visible): ``init_distributed``
  exports ``LOCAL_RANK=0`` and DeepSpeed's ``zero.Init`` places a module on that GPU;
- ``padded_llama``: a left-padded batch (one row fully padded) through a tiny bf16 Llama with SDPA: NaN in the
  hidden states of padded and of real positions, which SDPA kernels ran (profiler), then the fused log-probs
  with the padding ignored and their gradients: finite;
- ``compiled_tests``: tests/kernels/test_compiled_gpu.py, linear and token ops (interpreter off);
- ``timing``: in one process (autotune once per kernel), forward+backward at 8192×4096×131072 bf16: naive
  (materialised logits), Triton with acq_rel atomics, Triton with relaxed atomics (``atomic_sem``), plus
  Liger / Cut Cross-Entropy where importable; median time, peak memory, max |Δ log-prob| against naive;
- ``more_shapes``: the same at (4096, 2048, 128256) and (1024, 768, 50257) while time remains;
- ``large_index`` and ``dw_repeat``: 2^31-offset shapes against float64, dW repeatability (time allowing).

Autotune results persist across processes through Triton's cache (TRITON_CACHE_AUTOTUNING=1 and
TRITON_CACHE_DIR, set by scripts/gpu_check.sh). On CPU (``--dry-run``) every section's code runs on tiny
shapes (the torch path instead of Triton, no 2^31 index): tests/benchmarks/test_gpu_check.py checks the layout and the
per-section writes that way. Its figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOTAL_SECONDS = 540
# (name, seconds it may take at most on a GPU). The sum exceeds the budget on purpose: the last sections get
# what remains (a section never starts with less than MIN_SECONDS left).
SECTIONS = [("probe", 40), ("smoke_train", 150), ("srun_env", 60), ("padded_llama", 60), ("compiled_tests", 150),
            ("timing", 180), ("more_shapes", 120), ("large_index", 120), ("dw_repeat", 60)]
MIN_SECONDS = 15
TIMING_SHAPE = (8192, 4096, 131072)
MORE_SHAPES = [(4096, 2048, 128256), (1024, 768, 50257)]
TINY = {"timing": (64, 32, 1009), "more_shapes": [(32, 16, 503)], "large_index": [(8, 48, 3001), (96, 16, 2003)],
        "dw_repeat": (64, 32, 1009)}
LARGE_SHAPES = [(64, 16896, 128256), (16896, 256, 128256)]


# ----------------------------------------------------------------------------------------------------------
# The driver: sections as child processes, the summary rewritten after each
# ----------------------------------------------------------------------------------------------------------

def write_summary(out: Path, report: dict) -> None:
    """DIR/summary.json (everything) and DIR/summary.md (one line per section), written atomically."""
    for name, text in (("summary.json", json.dumps(report, indent=1)), ("summary.md", markdown(report))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"# GPU check ({meta.get('mode')}): {meta.get('verdict', 'running')}", "",
             f"started {meta.get('started')}, budget {meta.get('budget_s')} s, elapsed {meta.get('elapsed_s')} s",
             "", "| section | status | seconds | limit | figures |", "|---|---|---|---|---|"]
    for name, sec in report["sections"].items():
        lines.append(f"| {name} | {sec.get('status')} | {sec.get('seconds', '')} | {sec.get('limit_s', '')} | "
                     f"{figures(name, sec)} |")
    return "\n".join(lines) + "\n"


def figures(name: str, sec: dict) -> str:
    """The key numbers of a section, one cell."""
    try:
        if sec.get("status") not in ("ok", "failed"):
            return str(sec.get("reason") or sec.get("error") or "")[:200]
        if name == "probe":
            return (f"{sec.get('gpu')}; torch {sec.get('torch')} (CUDA {sec.get('cuda')}), triton {sec.get('triton')}, "
                    f"transformers {sec.get('transformers')}, deepspeed {sec.get('deepspeed')}")
        if name == "smoke_train" and "tokens_per_s_median" in sec:
            return f"{sec['steps']} steps, {sec['tokens_per_s_median']:.0f} tokens/s, losses {sec['losses']}"
        if name == "srun_env" and "local_rank" in sec:
            return f"SLURM_LOCALID 3 → LOCAL_RANK {sec['local_rank']}, zero.Init on {sec['zero_init_device']}"
        if name == "padded_llama" and "nan_real" in sec:
            return (f"NaN at real positions {sec['nan_real']}, at padding {sec['nan_padded']}; SDPA kernels "
                    f"{sec['sdpa_kernels'][:3]}; grads finite {sec['grads_finite']}")
        if name == "compiled_tests":
            return str(sec.get("counts", ""))
        if name in ("timing", "more_shapes") and "rows" in sec:
            return "; ".join(f"{r['shape']} {r['path']}: {r['time_ms']:.1f} ms" if "time_ms" in r
                             else f"{r['shape']} {r['path']}: {r.get('error', '')[:60]}" for r in sec["rows"])
        if name == "large_index" and "rows" in sec:
            return "; ".join(f"{r['N']}×{r['H']}×{r['V']}: ok {r['ok']}" for r in sec["rows"])
        if name == "dw_repeat" and "bitwise_equal" in sec:
            return f"bitwise equal {sec['bitwise_equal']}, max rel diff {sec['max_rel_diff']:.2e}"
        if sec.get("error"):
            return sec["error"].strip().splitlines()[-1][:200]
    except (KeyError, TypeError, ValueError) as err:  # a figure missing must not lose the summary
        return f"(figures unreadable: {err})"
    return ""


def run_sections(out: Path, names: list[str], *, dry_run: bool, budget: float, limits: dict[str, float],
                 meta: dict) -> dict:
    """Run each section in a child process within its limit and what is left of ``budget``."""
    started = time.monotonic()
    report = {"meta": meta, "sections": {}}
    install = out / "install.json"  # written by scripts/gpu_check.sh before this driver starts
    if install.is_file():
        report["sections"]["install"] = json.loads(install.read_text())
    (out / "sections").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fdpg-gpu-check-"))  # models and runs: not into DIR, which travels back
    for name in names:
        left = budget - (time.monotonic() - started)
        limit = min(limits[name], left)
        if left < MIN_SECONDS:
            report["sections"][name] = {"status": "not run", "reason": f"{left:.0f} s of the budget left"}
            write_summary(out, report)
            continue
        print(f"gpu_check: {name} (limit {limit:.0f} s) ...", flush=True)
        result_file = out / "sections" / f"{name}.json"
        result_file.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--out", str(out), "--work", str(work)]
        if dry_run:
            cmd.append("--dry-run")
        t0 = time.monotonic()
        # Its own process group: at the limit the section and everything it started (a training run, pytest)
        # are killed together, and the next section gets the GPU.
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=limit)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            rc = None
        (out / "sections" / f"{name}.log").write_text(log)
        if result_file.is_file():  # complete, or what a section stopped at its limit had written so far
            result = json.loads(result_file.read_text())
            if rc is None:
                result.update(status="timeout", reason=f"stopped at its {limit:.0f} s limit (rows so far kept)")
        elif rc is None:
            result = {"status": "timeout", "reason": f"stopped at its {limit:.0f} s limit", "log_tail": log[-2000:]}
        else:
            result = {"status": "failed", "error": f"exited {rc} without a result", "log_tail": log[-3000:]}
        result.update(seconds=round(time.monotonic() - t0, 1), limit_s=round(limit))
        report["sections"][name] = result
        meta["elapsed_s"] = round(time.monotonic() - started, 1)
        write_summary(out, report)
        print(f"gpu_check: {name}: {result['status']} in {result['seconds']} s", flush=True)
    bad = [n for n, s in report["sections"].items() if s.get("status") not in ("ok", "skipped")]
    meta["verdict"] = "all sections ok" if not bad else f"not ok: {', '.join(bad)}"
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    write_summary(out, report)
    return report


# ----------------------------------------------------------------------------------------------------------
# The sections (each runs in its own process: ``--section NAME``; returns a dict with "status")
# ----------------------------------------------------------------------------------------------------------

def section_probe(dev: str, dry: bool, work: Path) -> dict:
    import platform

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu (dry run)"}
    for mod in ("triton", "transformers", "deepspeed", "accelerate", "pydantic", "vllm", "liger_kernel",
                "cut_cross_entropy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as err:  # absent or broken: recorded, not fatal
            out[mod] = f"unavailable ({type(err).__name__})"
    if dev == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update(capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                   sms=props.multi_processor_count, bf16=torch.cuda.is_bf16_supported())
    from fdpg_scale.kernels.linear_logprobs import DEFAULT_ATOMIC_SEM
    out["default_atomic_sem"] = DEFAULT_ATOMIC_SEM
    return out


def section_smoke_train(dev: str, dry: bool, work: Path) -> dict:
    """``fdpg-scale train`` as a user runs it, one process: bf16 ZeRO-3 on the GPU (fp32 on CPU)."""
    steps = 2 if dry else 4
    out_dir = work / "smoke_run"
    cmd = [sys.executable, "-m", "fdpg_scale.cli", "train", "--config", "configs/smoke.yaml",
           f"model.path={work / 'tiny-llama'}", "model.build=tiny-llama", f"model.dtype={'fp32' if dry else 'bf16'}",
           f"deepspeed.config=configs/deepspeed/{'zero3_cpu' if dry else 'zero3_bf16'}.json",
           "sampling.generation_mode=gathered", f"train.steps={steps}", f"train.save_every={steps}",
           f"output_dir={out_dir}", "logging.progress_bar=false", "logging.tensorboard=false"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "SLURM_PROCID")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"status": "failed", "error": (proc.stdout + proc.stderr)[-3000:]}
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows[1:]] or [rows[0]["tokens_per_s"]]
    return {"status": "ok" if all(math.isfinite(r["loss"]) for r in rows) else "failed", "steps": len(rows),
            "tokens_per_s_median": statistics.median(rates),
            "time_split_last_step": {k: v for k, v in rows[-1].items() if k.startswith("time/")},
            "losses": [round(r["loss"], 4) for r in rows]}


_SRUN_CHILD = r'''
import json, os, sys
import torch
from fdpg_scale.distributed.launch import init_distributed
info = init_distributed()
import deepspeed
with deepspeed.zero.Init():
    layer = torch.nn.Linear(8, 8)
print(json.dumps({"local_rank": os.environ["LOCAL_RANK"], "slurm_localid": info.local_rank,
                  "current_device": torch.cuda.current_device() if torch.cuda.is_available() else "cpu",
                  "zero_init_device": str(layer.weight.device)}))
'''


def section_srun_env(dev: str, dry: bool, work: Path) -> dict:
    """srun mode with one GPU per task: task 3 of a node sees one GPU and must use it as device 0."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="3", SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="localhost", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if dev == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    proc = subprocess.run([sys.executable, "-c", _SRUN_CHILD], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"status": "failed", "error": (proc.stdout + proc.stderr)[-3000:]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    want = "0" if dev == "cuda" else "3"
    res["status"] = "ok" if res["local_rank"] == want else "failed"
    return res


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def section_padded_llama(dev: str, dry: bool, work: Path) -> dict:
    """Left padding with SDPA: NaN anywhere, which kernels ran, and the fused op's gradients."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fdpg_scale.kernels import linear_token_logprobs

    dtype = torch.float32 if dry else torch.bfloat16
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, num_hidden_layers=2, hidden_size=128, intermediate_size=256,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device=dev, dtype=dtype)
    ids = torch.randint(3, 1000, (4, 24), device=dev)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 5, 17, 24)):  # the last row is all padding
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    kernels: list[str] = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])) as prof:
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state      # [B, T, H]
        if dev == "cuda":
            torch.cuda.synchronize()
    kernels = sorted({e.name for e in prof.events() if re.search(r"attention|flash|fmha|cudnn|sdpa|efficient",
                                                                 e.name, re.I)})
    real = mask.bool()
    out = {"dtype": str(dtype), "nan_real": int(hidden[real].isnan().any(-1).sum()),
           "nan_padded": int(hidden[~real].isnan().any(-1).sum()), "padded_positions": int((~real).sum()),
           "sdpa_kernels": kernels}
    targets = torch.where(real[:, 1:], ids[:, 1:], -100)
    weight = model.lm_head.weight
    logp = linear_token_logprobs(hidden[:, :-1], weight, targets)
    (logp.sum()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    out["logprobs_finite"] = bool(torch.isfinite(logp).all())
    out["grads_finite"] = all(bool(torch.isfinite(g).all()) for g in grads)
    out["status"] = "ok" if out["logprobs_finite"] and out["grads_finite"] and out["nan_real"] == 0 else "failed"
    return out


def section_compiled_tests(dev: str, dry: bool, work: Path) -> dict:
    if dev != "cuda":
        return {"status": "skipped", "reason": "the compiled Triton kernels need a CUDA GPU"}
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/kernels/test_compiled_gpu.py", "-q", "-rs", "-x",
                           "-p", "no:cacheprovider", "-k", "linear or token"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", proc.stdout)}
    return {"status": "ok" if proc.returncode == 0 and counts.get("passed") else "failed", "counts": counts,
            "tail": proc.stdout[-1500:]}


def _timing_rows(shapes, dev: str, dry: bool, reps: int, partial: Path | None = None) -> list[dict]:
    """fwd+bwd of each path at each shape, in this process (autotuning once per kernel and shape).

    partial: rewritten after every row ({"status": "partial", "rows": [...]}), so that a section stopped at
    its limit (the first Triton call autotunes and compiles for a minute or more) keeps the rows it has."""
    import torch

    from fdpg_scale.kernels.linear_logprobs import LinearLogprobsParams, LinearLogprobsTriton

    dtype = torch.float32 if dry else torch.bfloat16
    rows = []
    for n, h, v in shapes:
        hidden, weight, targets, g = _inputs(n, h, v, dtype, dev)
        paths = {"naive": lambda hh, ww: torch.log_softmax((hh @ ww.T).float(), -1).gather(-1, targets[:, None])[:, 0]}
        if dry:
            from fdpg_scale.kernels import linear_token_logprobs
            paths["torch"] = lambda hh, ww: linear_token_logprobs(hh, ww, targets, impl="torch")
        else:
            for sem in ("acq_rel", "relaxed"):
                params = LinearLogprobsParams(atomic_sem=sem)
                paths[f"triton-{sem}"] = (lambda p: lambda hh, ww: LinearLogprobsTriton.apply(hh, ww, None, targets, p))(params)
            paths.update(_peer_paths(targets))
        ref = None
        for name, fn in paths.items():
            row = {"shape": f"{n}x{h}x{v}", "path": name}
            try:
                row.update(_time_fwd_bwd(fn, hidden, weight, g, dev, reps))
                if ref is None:
                    ref = row.pop("_out")
                else:
                    row["max_abs_diff_vs_naive"] = float((row.pop("_out") - ref).abs().max())
            except Exception as err:  # e.g. out of memory for the naive path: a finding
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                if dev == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            if partial is not None:
                partial.write_text(json.dumps({"status": "partial", "rows": rows}, indent=1))
        del hidden, weight
        if dev == "cuda":
            torch.cuda.empty_cache()
    return rows


def _peer_paths(targets) -> dict:
    """Liger's fused linear cross-entropy and Cut Cross-Entropy, where installed (negated losses = log-probs)."""
    paths = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
        paths["liger"] = lambda hh, ww: -loss(ww, hh, targets)
    except Exception:  # not installed: no row
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy
        paths["cce"] = lambda hh, ww: -linear_cross_entropy(hh, ww, targets, reduction="none")
    except Exception:  # not installed: no row
        pass
    return paths


def _time_fwd_bwd(fn, hidden, weight, g, dev: str, reps: int) -> dict:
    import torch

    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)

    def call():
        out = fn(h, w)
        (out.float() * g).sum().backward()
        h.grad = w.grad = None
        return out.detach().float()

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    out = call()  # compile / autotune / first touch
    sync()
    first = time.perf_counter() - t0
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if dev == "cuda" else 0
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - t0)
    row = {"time_ms": 1e3 * statistics.median(times), "first_call_s": round(first, 2), "reps": reps, "_out": out}
    if dev == "cuda":
        row["peak_extra_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
    return row


def section_timing(dev: str, dry: bool, work: Path, partial: Path | None = None) -> dict:
    rows = _timing_rows([TINY["timing"] if dry else TIMING_SHAPE], dev, dry, reps=2 if dry else 5, partial=partial)
    return {"status": "ok" if all("time_ms" in r for r in rows if r["path"] != "naive") else "failed", "rows": rows}


def section_more_shapes(dev: str, dry: bool, work: Path, partial: Path | None = None) -> dict:
    rows = _timing_rows(TINY["more_shapes"] if dry else MORE_SHAPES, dev, dry, reps=2 if dry else 5,
                        partial=partial)
    return {"status": "ok" if all("time_ms" in r for r in rows if r["path"] != "naive") else "failed", "rows": rows}


def section_large_index(dev: str, dry: bool, work: Path) -> dict:
    import torch

    return check_large_index(TINY["large_index"] if dry else LARGE_SHAPES,
                             torch.float32 if dry else torch.bfloat16, dev, 32 if dry else 1024)


def section_dw_repeat(dev: str, dry: bool, work: Path) -> dict:
    import torch

    out = check_dw_repeat(TINY["dw_repeat"] if dry else (4096, 2048, 128256), torch.float32 if dry else torch.bfloat16,
                          dev)
    out["status"] = "ok"
    return out


# ----------------------------------------------------------------------------------------------------------
# Checks kept from the earlier, longer GPU check (used by large_index and dw_repeat)
# ----------------------------------------------------------------------------------------------------------

def _inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str, seed: int = 0):
    """hidden [n, h] and weight [v, h] of unit-scale logits (std ≈ 3), targets [n], upstream gradient g [n]."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(device=device, dtype=dtype)
    weight = (torch.randn(v, h, generator=gen) * (3.0 / math.sqrt(h))).to(device=device, dtype=dtype)
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    g = torch.randn(n, generator=gen).to(device)
    return hidden, weight, targets, g


def _reference64(hidden, weight, targets, g, rows, chunk: int):
    """float64 log-probs [N], dh [N, H] and dW[rows] [R, H] of out·g, chunked over tokens (no [N, V] fp64)."""
    import torch

    w64 = weight.double()
    out = torch.empty(hidden.shape[0], dtype=torch.float64, device=hidden.device)
    dh = torch.empty(hidden.shape, dtype=torch.float64, device=hidden.device)
    dw_rows = torch.zeros(len(rows), hidden.shape[1], dtype=torch.float64, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk):
        h64 = hidden[s:s + chunk].double()
        logp = torch.log_softmax(h64 @ w64.T, dim=-1)
        t = targets[s:s + chunk]
        out[s:s + chunk] = logp.gather(1, t[:, None])[:, 0]
        p = logp.exp_()
        gs = g[s:s + chunk].double()
        dh[s:s + chunk] = gs[:, None] * (w64[t] - p @ w64)
        coef = -p[:, rows] * gs[:, None]                       # d out / d logits on the chosen rows
        coef += (t[:, None] == rows[None, :]).double() * gs[:, None]
        dw_rows += coef.T @ h64
    return out, dh, dw_rows


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    import torch

    return float((a.double() - b).norm() / b.norm().clamp_min(1e-300))


def check_large_index(shapes, dtype: torch.dtype, device: str, chunk: int) -> dict:
    """Fused log-probs and gradients at shapes whose flat offsets pass 2^31, against float64."""
    import torch

    from fdpg_scale.kernels import linear_token_logprobs

    rows_out = []
    for n, h, v in shapes:
        hidden, weight, targets, g = _inputs(n, h, v, dtype, device)
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
        out = linear_token_logprobs(hidden, weight, targets)
        (out * g).sum().backward()
        gen = torch.Generator(device="cpu").manual_seed(1)
        rows = torch.unique(torch.cat([targets.cpu()[:256], torch.randint(0, v, (256,), generator=gen)])).to(device)
        ref, dh_ref, dw_ref = _reference64(hidden.detach(), weight.detach(), targets, g, rows, chunk)
        row = {"N": n, "H": h, "V": v, "dtype": str(dtype).replace("torch.", ""), "V*H": v * h, "N*V": n * v,
               "over_2^31": [k for k, x in (("V*H", v * h), ("N*V", n * v)) if x > 2 ** 31],
               "logprob_max_abs_err": float((out.detach().double() - ref).abs().max()),
               "dh_rel_err": _rel(hidden.grad, dh_ref), "dw_rows_rel_err": _rel(weight.grad[rows], dw_ref),
               "finite": bool(torch.isfinite(out).all() and torch.isfinite(hidden.grad).all()
                              and torch.isfinite(weight.grad).all())}
        # bf16 inputs with fp32 accumulation: errors of 1e-3..1e-2 are rounding; an offset that wraps gives O(1)
        row["ok"] = row["finite"] and row["logprob_max_abs_err"] < 0.05 and row["dh_rel_err"] < 0.02 \
            and row["dw_rows_rel_err"] < 0.02
        rows_out.append(row)
        del hidden, weight, out, dh_ref, dw_ref
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"status": "ok" if all(r["ok"] for r in rows_out) else "failed", "rows": rows_out}


def check_dw_repeat(shape, dtype: torch.dtype, device: str, repeats: int = 3) -> dict:
    """The same fwd+bwd ``repeats`` times: bitwise-equal dW? max |dW_i − dW_0| relative to max |dW_0|."""
    import torch

    from fdpg_scale.kernels import linear_token_logprobs

    n, h, v = shape
    hidden, weight, targets, g = _inputs(n, h, v, dtype, device, seed=2)
    grads = []
    for _ in range(repeats):
        w = weight.detach().clone().requires_grad_(True)
        (linear_token_logprobs(hidden, w, targets) * g).sum().backward()
        grads.append(w.grad.float())
    scale = float(grads[0].abs().max())
    diffs = [float((x - grads[0]).abs().max()) for x in grads[1:]]
    return {"N": n, "H": h, "V": v, "dtype": str(dtype).replace("torch.", ""), "repeats": repeats,
            "bitwise_equal": all(d == 0.0 for d in diffs), "max_abs_diff": max(diffs),
            "max_rel_diff": max(diffs) / max(scale, 1e-30)}


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------

def _run_one(name: str, out: Path, work: Path, dry: bool) -> int:
    """Child process: run one section, write DIR/sections/NAME.json (status, figures or the error)."""
    fn = globals()[f"section_{name}"]
    result_file = out / "sections" / f"{name}.json"
    # sections that write partial results as they go get the file (timing: the rows so far)
    kwargs = {"partial": result_file} if "partial" in inspect.signature(fn).parameters else {}
    try:
        result = fn("cpu" if dry else "cuda", dry, work, **kwargs)
        result.setdefault("status", "ok")
    except Exception as err:  # the finding is the error itself
        result = {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    result_file.write_text(json.dumps(result, indent=1, default=str))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="directory for summary.json, summary.md, sections/")
    p.add_argument("--dry-run", action="store_true", help="every section's code on CPU, tiny shapes")
    p.add_argument("--no-gpu", action="store_true", help="say there is no GPU, write the summary, run nothing")
    p.add_argument("--sections", default=",".join(n for n, _ in SECTIONS))
    p.add_argument("--budget", type=float, default=TOTAL_SECONDS, help="seconds for all sections together")
    p.add_argument("--limit", action="append", default=[], metavar="NAME=SECONDS",
                   help="a section's own limit (repeatable)")
    p.add_argument("--section", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sections").mkdir(exist_ok=True)
    if args.section:
        return _run_one(args.section, args.out, args.work, args.dry_run)
    limits = dict(SECTIONS)
    for item in args.limit:
        name, _, value = item.partition("=")
        if name not in limits or not value.replace(".", "", 1).isdigit():
            p.error(f"--limit {item!r}: expected NAME=SECONDS with NAME one of {', '.join(limits)}")
        limits[name] = float(value)
    names = [n for n in args.sections.split(",") if n]
    unknown = [n for n in names if n not in limits]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)} (known: {', '.join(limits)})")
    meta = {"mode": "no GPU" if args.no_gpu else "dry run (CPU)" if args.dry_run else "GPU",
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "budget_s": args.budget, "elapsed_s": 0}
    if args.no_gpu:
        meta["verdict"] = "no CUDA GPU visible: nothing was checked"
        report = {"meta": meta, "sections": {}}
        install = args.out / "install.json"
        if install.is_file():
            report["sections"]["install"] = json.loads(install.read_text())
        write_summary(args.out, report)
        print(f"gpu_check: no CUDA GPU visible on this machine: nothing to check (summary in {args.out})")
        return 0
    report = run_sections(args.out, names, dry_run=args.dry_run, budget=args.budget, limits=limits, meta=meta)
    print(markdown(report))
    return 0 if report["meta"]["verdict"] == "all sections ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
