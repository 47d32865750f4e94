"""The GPU check of the project in one run: one JSON and one table (``scripts/gpu_check.sh`` runs it).

    python benchmarks/gpu_check.py --out gpu_check.json                    # on a CUDA GPU (≤ 10 min on one)
    python benchmarks/gpu_check.py --device cpu --tiny --out cpu.json      # every section's code on CPU, tiny

Sections (each records its status, seconds and figures; one that fails does not stop the others):

- ``compiled_tests``: tests/kernels/test_compiled_gpu.py with the Triton interpreter off (CUDA only);
- ``large_index``: linear_token_logprobs forward and backward at V·H > 2^31 and at N·V > 2^31 (where 32-bit
  offsets would wrap) against float64 references of the same bf16 inputs: log-probs, dh, and dW on the
  target rows plus random rows;
- ``bench``: benchmarks/bench_kernels.py (time and peak memory, fwd and fwd+bwd; naive, triton, cce, liger
  where installed) at (8192, 4096, 128256) and two smaller shapes, bf16;
- ``dw_repeat``: the same backward three times: is dW bitwise repeatable (the kernel accumulates dW with
  atomics, whose order varies), and how far apart;
- ``hf_vs_fused``: a Llama's log-probs in bf16 as transformers computes them (bf16 lm_head, upcast after:
  what generate records) and as the fused op does (fp32 accumulation), both against float64, per token and
  summed over 128-token sequences: the noise in π/q that rescoring log q removes;
- ``smoke_train``: ``fdpg-scale train`` on one device, bf16, ZeRO-3, gathered generation, a few steps of a
  tiny Llama: it runs, its loss is finite, and its tokens/s (median over the steps after the first).

On CPU (``--device cpu --tiny``) the same code runs on small shapes (no 2^31 index, the torch path instead
of Triton): that is how tests/test_gpu_check.py exercises it without a GPU. Its figures say nothing about
a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BENCH_SHAPES = [(1024, 768, 50257), (4096, 2048, 128256), (8192, 4096, 128256)]
TINY_BENCH_SHAPES = [(64, 32, 1009)]
# (N, H, V) with V·H > 2^31 (a [V, H] offset overflows int32), then N·V > 2^31 (an [N, V] offset would)
LARGE_SHAPES = [(64, 16896, 128256), (16896, 256, 128256)]
TINY_LARGE_SHAPES = [(8, 48, 3001), (96, 16, 2003)]


def _section(fn, *args) -> dict:
    start = time.perf_counter()
    try:
        out = fn(*args)
        out.setdefault("status", "ok")
    except Exception as err:  # a failed section is a finding, not the end of the check
        out = {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def _inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str, seed: int = 0):
    """hidden [n, h] and weight [v, h] of unit-scale logits (std ≈ 3), targets [n], upstream gradient g [n]."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(device=device, dtype=dtype)
    weight = (torch.randn(v, h, generator=gen) * (3.0 / math.sqrt(h))).to(device=device, dtype=dtype)
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    g = torch.randn(n, generator=gen).to(device)
    return hidden, weight, targets, g


def _reference64(hidden, weight, targets, g, rows, chunk: int):
    """float64 log-probs [N], dh [N, H] and dW[rows] [R, H] of out·g, chunked over tokens (no [N, V] fp64)."""
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
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-300))


def check_large_index(shapes, dtype: torch.dtype, device: str, chunk: int) -> dict:
    """Fused log-probs and gradients at shapes whose flat offsets pass 2^31, against float64."""
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


def check_hf_vs_fused(config_json: Path, device: str, batch: int, seq: int, head_scale: float) -> dict:
    """log-probs of random sequences under a randomly initialised Llama in bf16: transformers' bf16 logits
    (upcast after the head) and the fused head (fp32 accumulation), each against float64 of the same
    bf16 hidden states and weights. lm_head is scaled by ``head_scale`` so logits reach the magnitudes of a
    trained model (reported)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fdpg_scale.kernels import linear_token_logprobs

    config = AutoConfig.from_pretrained(config_json.parent)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(device).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
        ids = torch.randint(0, config.vocab_size, (batch, seq + 1), device=device)
        hidden = model.base_model(input_ids=ids).last_hidden_state[:, :-1]       # [B, T, H] bf16
        weight = model.get_output_embeddings().weight
        targets = ids[:, 1:]
        hf_logits = model(input_ids=ids).logits[:, :-1]                            # bf16, as generate sees them
        hf = torch.log_softmax(hf_logits.float(), -1).gather(-1, targets[..., None])[..., 0]
        fused = linear_token_logprobs(hidden, weight, targets)
        ref = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(-1, targets[..., None])[..., 0]
    out = {"model": str(config_json), "batch": batch, "seq": seq, "head_scale": head_scale,
           "logit_abs_mean": float(hf_logits.float().abs().mean()), "logit_abs_max": float(hf_logits.float().abs().max())}
    for name, lp in (("hf_bf16", hf), ("fused", fused)):
        tok = (lp.double() - ref).abs()
        seq_err = (lp.double() - ref).sum(-1)
        out[name] = {"token_max_abs_err": float(tok.max()), "token_mean_abs_err": float(tok.mean()),
                     "sequence_sum_err_mean": float(seq_err.mean()), "sequence_sum_err_abs_max": float(seq_err.abs().max()),
                     "sequence_sum_err_std": float(seq_err.std()) if batch > 1 else 0.0}
    return out


def run_bench(shapes, device: str, dtype: str, paths: str, reps: int, workdir: Path) -> dict:
    """benchmarks/bench_kernels.py on these shapes; its JSON is kept whole under "results"."""
    out = workdir / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks/bench_kernels.py"), "--device", device, "--dtype", dtype,
           "--paths", paths, "--reps", str(reps), "--timeout", "240", "--out", str(out)]
    for n, h, v in shapes:
        cmd += ["--shape", f"{n},{h},{v}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        return {"status": "failed", "error": proc.stderr[-3000:], "command": " ".join(cmd[1:])}
    return {"command": " ".join(cmd[1:]), "results": json.loads(out.read_text())}


def run_compiled_tests(device: str) -> dict:
    if device != "cuda":
        return {"status": "skipped", "reason": "the compiled Triton kernels need a CUDA GPU"}
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/kernels/test_compiled_gpu.py", "-q", "-rs",
                           "-p", "no:cacheprovider"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", proc.stdout)}
    return {"status": "ok" if proc.returncode == 0 and counts.get("passed") else "failed", "counts": counts,
            "tail": proc.stdout[-1500:]}


def run_smoke_train(device: str, steps: int, workdir: Path) -> dict:
    """One process, bf16, ZeRO-3, gathered generation: the steps run and report tokens/s."""
    out_dir = workdir / "smoke_run"
    cmd = [sys.executable, "-m", "fdpg_scale.cli", "train", "--config", "configs/smoke.yaml",
           f"model.path={workdir / 'tiny-llama'}", "model.build=tiny-llama", "model.dtype=bf16",
           "deepspeed.config=configs/deepspeed/zero3_bf16.json", "sampling.generation_mode=gathered",
           f"train.steps={steps}", f"train.save_every={steps}", f"output_dir={out_dir}",
           "logging.progress_bar=false", "logging.tensorboard=false"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "SLURM_PROCID")}
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return {"status": "failed", "error": (proc.stdout + proc.stderr)[-3000:]}
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows[1:]] or [rows[0]["tokens_per_s"]]
    return {"status": "ok" if all(math.isfinite(r["loss"]) for r in rows) else "failed", "steps": len(rows),
            "tokens_per_s_median": statistics.median(rates), "time_per_step_median": statistics.median(
                r["time/step"] for r in rows[1:] or rows),
            "logq_mismatch_mean": rows[-1].get("logq_mismatch_mean"), "losses": [r["loss"] for r in rows]}


def table(report: dict) -> str:
    """A Markdown summary of the JSON (one line per section, then the key figures)."""
    lines = ["| section | status | seconds | figures |", "|---|---|---|---|"]
    for name, sec in report["sections"].items():
        figures = ""
        if name == "large_index" and "rows" in sec:
            figures = "; ".join(f"{r['N']}×{r['H']}×{r['V']} ({','.join(r['over_2^31']) or 'small'}): lp err "
                                f"{r['logprob_max_abs_err']:.2e}, dh {r['dh_rel_err']:.1e}, dW {r['dw_rows_rel_err']:.1e}"
                                for r in sec["rows"])
        elif name == "dw_repeat" and "bitwise_equal" in sec:
            figures = f"bitwise equal: {sec['bitwise_equal']}, max rel diff {sec['max_rel_diff']:.2e}"
        elif name == "hf_vs_fused" and "fused" in sec:
            figures = (f"|logit| mean {sec['logit_abs_mean']:.1f}; per-token max err hf_bf16 "
                       f"{sec['hf_bf16']['token_max_abs_err']:.3f} vs fused {sec['fused']['token_max_abs_err']:.2e}; "
                       f"{sec['seq']}-token sum err std hf_bf16 {sec['hf_bf16']['sequence_sum_err_std']:.3f} vs fused "
                       f"{sec['fused']['sequence_sum_err_std']:.2e}")
        elif name == "smoke_train" and "tokens_per_s_median" in sec:
            figures = f"{sec['steps']} steps, {sec['tokens_per_s_median']:.0f} tokens/s, {sec['time_per_step_median']:.2f} s/step"
        elif name == "compiled_tests":
            figures = sec.get("reason") or str(sec.get("counts", ""))
        elif name == "bench" and "results" in sec:
            figures = f"{len(sec['results'].get('results', []))} rows (see the JSON / bench_kernels table)"
        elif sec.get("error"):
            figures = sec["error"].splitlines()[-1][:160] if sec["error"].strip() else ""
        lines.append(f"| {name} | {sec['status']} | {sec['seconds']} | {figures} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="write the JSON here (the table goes to stdout and OUT.md)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="small shapes (no 2^31 index): for checking this script")
    p.add_argument("--sections", default="compiled_tests,large_index,bench,dw_repeat,hf_vs_fused,smoke_train")
    p.add_argument("--train-steps", type=int, default=6)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but no CUDA GPU is visible (use --device cpu --tiny to check the script)",
              file=sys.stderr)
        return 2
    wanted = args.sections.split(",")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    plan = {
        "compiled_tests": (run_compiled_tests, args.device),
        "large_index": (check_large_index, TINY_LARGE_SHAPES if args.tiny else LARGE_SHAPES, dtype, args.device,
                        32 if args.tiny else 1024),
        "bench": (run_bench, TINY_BENCH_SHAPES if args.tiny else BENCH_SHAPES, args.device,
                  "fp32" if args.device == "cpu" else "bf16",
                  "naive,torch" if args.device == "cpu" else "naive,triton,cce,liger", 1 if args.tiny else 3, workdir),
        "dw_repeat": (check_dw_repeat, (64, 32, 1009) if args.tiny else (4096, 2048, 128256), dtype, args.device),
        "hf_vs_fused": (check_hf_vs_fused, REPO / "configs/models/llama-1b/config.json", args.device,
                        2 if args.tiny else 8, 16 if args.tiny else 128, 10.0),
        "smoke_train": (run_smoke_train, args.device, 2 if args.tiny else args.train_steps, workdir),
    }
    unknown = sorted(set(wanted) - set(plan))
    if unknown:
        print(f"gpu_check: unknown section(s) {', '.join(unknown)} (known: {', '.join(plan)})", file=sys.stderr)
        return 2
    if args.tiny and "hf_vs_fused" in wanted:  # the shipped 1B shape is too big for a CPU check of the script
        plan["hf_vs_fused"] = (check_hf_vs_fused, _tiny_llama_config(workdir), args.device, 2, 16, 10.0)
    meta = {"device": args.device, "tiny": args.tiny, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    report = {"meta": meta, "sections": {}}
    for name in wanted:
        fn, *fargs = plan[name]
        print(f"gpu_check: {name} ...", flush=True)
        report["sections"][name] = _section(fn, *fargs)
        Path(args.out).write_text(json.dumps(report, indent=1))  # partial results survive a time-out
    text = table(report)
    Path(args.out).with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0 if all(s["status"] in ("ok", "skipped") for s in report["sections"].values()) else 1


def _tiny_llama_config(workdir: Path) -> Path:
    """A Llama config.json of the tiny test model's shape, written to ``workdir``."""
    from transformers import LlamaConfig

    path = workdir / "tiny-llama-config"
    LlamaConfig(vocab_size=1000, num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False).save_pretrained(path)
    return path / "config.json"


if __name__ == "__main__":
    raise SystemExit(main())
