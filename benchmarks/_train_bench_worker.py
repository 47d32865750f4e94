"""Worker for bench_train.py, launched under ``torchrun --standalone``; not meant to be run by hand.

    torchrun --standalone --nproc_per_node N benchmarks/_train_bench_worker.py memory --model-dir D --out F.json
    torchrun --standalone --nproc_per_node 1 benchmarks/_train_bench_worker.py head --model-dir D --out F.json

``memory``: every rank builds the policy with ``engines.build_policy`` (ZeRO-3, the smoke DeepSpeed JSON,
torch AdamW client optimizer), takes ONE optimizer step on a random batch (Adam's moments exist only after
the first step), then counts the bytes this rank holds, by distinct storage (views of one flat buffer are
counted once, padding included):
  params    : the storages behind every parameter's shard ``p.ds_tensor`` (plus ``p.data`` when a
              parameter stayed gathered, which with ``stage3_param_persistence_threshold: 0`` none does);
  optimizer : the storages behind ZeRO-3's fp32 master partitions (``optimizer.fp32_partitioned_groups_flat``,
              stage3.py) and every tensor of the wrapped torch optimizer's ``state`` (Adam's exp_avg,
              exp_avg_sq, step), not already counted under params;
Rank 0 writes the per-rank figures to --out.

``head``: one process (world 1). The same engine, the same batch, one full step (forward, backward, optimizer
step) through two paths:
  fused : ``engines.sequence_logprobs`` (FusedHeadLM.forward: last hidden state -> linear_token_logprobs,
          never a [B, T, V] tensor);
  naive : the HF model's own forward -> logits [B, T, V] -> log_softmax -> gather (the materialised path).
The naive path runs through the SAME engine call (its forward is swapped on the wrapper instance, so
DeepSpeed's hooks, the gradient reduction and the optimizer are identical). Paths run in blocks
(--rounds × [fused block, naive block]): each block starts with one untimed step (ZeRO-3 re-records its
parameter-fetch trace when the forward changes), then --reps timed steps, then one step measured for
memory alone: CPU: VmHWM − VmRSS before the step, after malloc_trim(0) and resetting VmHWM through
/proc/self/clear_refs; CUDA: max_memory_allocated − memory_allocated before the step.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

from _cpu_peak_memory import cpu_peak_since, start_cpu_peak  # this folder (the script's sys.path[0])

REPO = Path(__file__).resolve().parents[1]


def ds_config(*, world: int, micro_batch: int) -> dict:
    """The smoke DeepSpeed JSON with the batch keys run_setup.deepspeed_config would derive (accumulation 1)."""
    ds = json.loads((REPO / "configs" / "deepspeed" / "zero3_cpu.json").read_text())
    ds.update(train_batch_size=micro_batch * world, train_micro_batch_size_per_gpu=micro_batch,
              gradient_accumulation_steps=1, gradient_clipping=1.0)
    return ds


def random_batch(vocab: int, batch: int, seq: int, device: torch.device, seed: int = 0):
    """input_ids [B, T] random tokens, attention_mask [B, T] ones, loss_mask [B, T] ones after position 0."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    attn = torch.ones_like(ids)
    loss_mask = torch.ones_like(ids)
    loss_mask[:, 0] = 0
    return ids.to(device), attn.to(device), loss_mask.to(device)


def naive_forward(self, input_ids, attention_mask, loss_mask, temperature: float = 1.0):
    """FusedHeadLM.forward's contract through materialised logits: [B, T] -> float32 [B, T]."""
    from fdpg_scale.distributed.engines import position_ids_from_mask

    logits = self.hf_model(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, -1)           # [B, T-1, V]
    out = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1) * loss_mask[:, 1:]  # [B, T-1]
    return torch.nn.functional.pad(out, (1, 0))


def _storages(tensors) -> dict[int, int]:
    """{storage data_ptr: storage bytes} over the given tensors (each storage once)."""
    out = {}
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.numel() == 0:
            continue
        s = t.untyped_storage()
        out[s.data_ptr()] = s.nbytes()
    return out


def zero3_bytes(engine) -> dict[str, int]:
    """This rank's bytes of parameter shards and of optimizer state (fp32 partitions + Adam state)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    params = list(engine.module.parameters())
    missing = [i for i, p in enumerate(params) if not hasattr(p, "ds_tensor")]
    if missing:
        raise RuntimeError(f"{len(missing)} parameters are not ZeRO-3 partitioned: not a ZeRO-3 engine")
    param_st = _storages(p.ds_tensor for p in params)
    param_st.update(_storages(p.data for p in params if p.ds_status == ZeroParamStatus.AVAILABLE))
    opt = engine.optimizer
    fp32 = list(getattr(opt, "fp32_partitioned_groups_flat", []))
    if not fp32:
        raise RuntimeError(f"{type(opt).__name__} has no fp32_partitioned_groups_flat: not ZeRO-3's optimizer")
    state_tensors = [v for st in opt.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    if not state_tensors:
        raise RuntimeError("the optimizer has no state: call after one optimizer step")
    opt_st = {k: v for k, v in _storages(fp32 + state_tensors).items() if k not in param_st}
    return {"params": sum(param_st.values()), "optimizer": sum(opt_st.values()),
            "n_param_elems": sum(p.ds_numel for p in params)}


def run_memory(args) -> None:
    from fdpg_scale.distributed.launch import init_distributed, is_rank0
    from fdpg_scale.distributed.engines import build_policy, sequence_logprobs, train_step

    launch = init_distributed()
    engine = build_policy(args.model_dir, ds_config(world=launch.world_size, micro_batch=1), lr=1e-3)
    vocab = engine.module.hf_model.config.vocab_size
    ids, attn, mask = random_batch(vocab, 1, args.seq, engine.device, seed=launch.rank)
    loss = -sequence_logprobs(engine, ids, attn, mask).sum(-1).mean()
    if not train_step(engine, loss):
        raise RuntimeError("the step did not reach an accumulation boundary")
    mine = zero3_bytes(engine)
    everyone = [None] * launch.world_size
    torch.distributed.all_gather_object(everyone, mine)
    if is_rank0():
        Path(args.out).write_text(json.dumps({"world": launch.world_size, "per_rank": everyone}))


def measured_step(engine, ids, attn, mask, cuda: bool) -> tuple[int, int]:
    """One step measured alone -> (peak extra bytes through forward+backward, through the whole step).

    The backward and the optimizer step are called apart (``train_step`` does both) so that the head's peak
    is seen even when the optimizer step's own temporaries (AdamW over the flat fp32 partition) are larger.
    """
    from fdpg_scale.distributed.engines import sequence_logprobs

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = start_cpu_peak()

    def peak() -> int:
        if cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - before
        return cpu_peak_since(before)

    loss = -sequence_logprobs(engine, ids, attn, mask).sum(-1).mean()
    engine.backward(loss)
    del loss
    fwd_bwd = peak()
    engine.step()
    return fwd_bwd, peak()


def run_head(args) -> None:
    from fdpg_scale.distributed.launch import init_distributed
    from fdpg_scale.distributed.engines import sequence_logprobs, train_step, build_policy

    launch = init_distributed()
    if launch.world_size != 1:
        raise ValueError(f"head mode runs on one rank, got world size {launch.world_size}")
    engine = build_policy(args.model_dir, ds_config(world=1, micro_batch=args.batch), lr=1e-4)
    cuda = engine.device.type == "cuda"
    vocab = engine.module.hf_model.config.vocab_size
    ids, attn, mask = random_batch(vocab, args.batch, args.seq, engine.device)
    module = engine.module

    def step() -> float:
        loss = -sequence_logprobs(engine, ids, attn, mask).sum(-1).mean()
        train_step(engine, loss)
        return float(loss)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def set_path(path: str):
        if path == "naive":
            module.forward = types.MethodType(naive_forward, module)  # instance attribute shadows the class's
        elif "forward" in module.__dict__:
            del module.forward

    # The two paths must compute the same log π (else the comparison is of different things).
    with torch.no_grad():
        set_path("fused")
        lp_fused = sequence_logprobs(engine, ids, attn, mask).float().cpu()
        set_path("naive")
        lp_naive = sequence_logprobs(engine, ids, attn, mask).float().cpu()
    max_diff = float((lp_fused - lp_naive).abs().max())

    res = {p: {"times": [], "peak_bytes": [], "peak_fwd_bwd_bytes": []} for p in ("fused", "naive")}
    for _ in range(args.rounds):
        for path in ("fused", "naive"):
            set_path(path)
            step()  # untimed: trace re-recording, first touch of this path's buffers
            for _ in range(args.reps):
                sync()
                t0 = time.perf_counter()
                step()
                sync()
                res[path]["times"].append(time.perf_counter() - t0)
            gc.collect()
            fb, whole = measured_step(engine, ids, attn, mask, cuda)
            res[path]["peak_fwd_bwd_bytes"].append(fb)
            res[path]["peak_bytes"].append(whole)
    cfg = engine.module.hf_model.config
    out = {"device": str(engine.device), "device_name": torch.cuda.get_device_name() if cuda else "cpu",
           "memory_measure": "max_memory_allocated delta" if cuda else "VmHWM - VmRSS (peak RSS delta)",
           "batch": args.batch, "seq": args.seq, "vocab": vocab, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
           "threads": torch.get_num_threads(), "logprob_max_abs_diff": max_diff}
    for path, r in res.items():
        out[path] = {"times": r["times"], "min_s": min(r["times"]), "median_s": statistics.median(r["times"]),
                     "peak_bytes": r["peak_bytes"], "peak_fwd_bwd_bytes": r["peak_fwd_bwd_bytes"],
                     # the least disturbed round
                     "peak_mb": min(r["peak_bytes"]) / 2**20, "peak_fwd_bwd_mb": min(r["peak_fwd_bwd_bytes"]) / 2**20}
    Path(args.out).write_text(json.dumps(out))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("memory", "head"))
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=8, help="head: sequences per step")
    ap.add_argument("--reps", type=int, default=3, help="head: timed steps per block")
    ap.add_argument("--rounds", type=int, default=2, help="head: [fused, naive] block pairs")
    args = ap.parse_args(argv)
    (run_memory if args.mode == "memory" else run_head)(args)
    # Leave together and tear the group down explicitly: a rank that exits while a peer still holds the gloo
    # connection was seen to abort ("terminate called without an active exception", exit -6).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    # The results are written and the group is gone; leave without running interpreter teardown. Under
    # DeepSpeed on CPU a background thread occasionally outlives it and aborts the process at exit
    # ("terminate called without an active exception", SIGABRT) after a successful run (seen in CI).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
