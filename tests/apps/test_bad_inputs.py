"""Every bad input is one line naming the culprit, with exit status 2: a table of 150+ cases across ``train``,
``plan``, ``export``, ``eval``, ``sweep`` and ``reproduce --grid``.

In-process (milliseconds each): ``fdpg_scale.cli.main`` with the real argument parser, config loader, pre-start
checks (``training/preflight.py``, what ``train`` runs before any engine) and error reporting; only the
process-group start is left out (``loop.train`` is replaced by the pre-start checks, for the world size the
row names). Real processes, for what needs one: the CLI on a model without weights (no pre-start shortcut),
torchrun on 2 ranks (the line printed once, not once per rank), and an unreachable distributional moment
(needs the engines to draw the λ-fit samples). Those three cost about 1-2 min on 2 cores.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from fdpg_scale import cli
from fdpg_scale.errors import EXIT_BAD_INPUT
from fdpg_scale.training import loop
from fdpg_scale.training.preflight import preflight
from tests.harness import fill_paths, one_line, run_cli

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"
DS_JSON = json.loads((ROOT / "configs" / "deepspeed" / "zero3_cpu.json").read_text())


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_gpt2):
    """The tiny model, broken copies of it, and bad config / prompts / DeepSpeed files."""
    root = tmp_path_factory.mktemp("bad")
    model = tiny_gpt2

    def variant(name, edit):
        d = root / name
        shutil.copytree(model, d)
        edit(d)
        return d

    def json_edit(path, **changes):
        data = json.loads(path.read_text())
        for k, v in changes.items():
            if v is None:
                data.pop(k, None)
            else:
                data[k] = v
        path.write_text(json.dumps(data))

    f = {"model": model, "root": root}
    f["no_weights"] = variant("no_weights", lambda d: (d / "model.safetensors").unlink())
    f["missing_shard"] = variant("missing_shard", lambda d: (
        (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors"),
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))))
    f["bad_index"] = variant("bad_index", lambda d: (
        (d / "model.safetensors").unlink(), (d / "model.safetensors.index.json").write_text("[1, 2]")))
    f["no_tokenizer"] = variant("no_tokenizer", lambda d: (d / "tokenizer.json").unlink())
    f["no_pad"] = variant("no_pad", lambda d: json_edit(d / "tokenizer_config.json", pad_token=None, eos_token=None))
    f["small_vocab"] = variant("small_vocab", lambda d: json_edit(d / "config.json", vocab_size=100))
    f["bert"] = variant("bert", lambda d: json_edit(d / "config.json", architectures=["BertForMaskedLM"]))
    f["no_config"] = variant("no_config", lambda d: (d / "config.json").unlink())
    f["not_a_dir"] = root / "model.txt"
    f["not_a_dir"].write_text("x")
    for name, body in {"bad.yaml": "train: [1, 2\n", "list.yaml": "- 1\n- 2\n",
                       "pickle.yaml": "seed: !!python/object/apply:os.system ['echo pwned']\n",
                       "typo.yaml": SMOKE.read_text() + "trian: {steps: 3}\n",
                       "prompts_bad.jsonl": '{"prompt": "def f():"}\nnot json\n', "prompts_empty.jsonl": "\n\n",
                       "prompts_nokey.jsonl": '{"text": "x"}\n',
                       "prompts_long.jsonl": json.dumps({"prompt": "def f(x):\n    return x " * 12}) + "\n",
                       "ds_bad.json": "{not json", "ds_auto.json": json.dumps({**DS_JSON, "train_batch_size": "auto"}),
                       "ds_stage2.json": json.dumps({**DS_JSON, "zero_optimization": {"stage": 2}}),
                       "ds_batch.json": json.dumps({**DS_JSON, "train_batch_size": 16}),
                       "ds_bf16.json": json.dumps({**DS_JSON, "bf16": {"enabled": True}})}.items():
        (root / name).write_text(body)
    return f


_GRID = "name: g\nsizes: {tiny: {n_layer: 2}}\ncells: [[SMOKE, tiny]]\n"
# grid files of `reproduce --grid`: name -> (the file's text, what the one line must contain)
GRIDS = {
    "unknown-key": (_GRID + "bogus: 1\n", "'bogus'"),
    "no-name": (_GRID.replace("name: g\n", ""), "'name'"),
    "no-cells": (_GRID.replace("[[SMOKE, tiny]]", "[]"), "at least one cell"),
    "cell-not-a-pair": (_GRID.replace("[[SMOKE, tiny]]", "[SMOKE]"), "cells[0]"),
    "unknown-size": (_GRID.replace(", tiny]]", ", huge]]"), "unknown size"),
    "size-unknown-key": (_GRID.replace("n_layer", "n_lyer"), "sizes.tiny.n_lyer"),
    "no-divergences": (_GRID + "divergences: []\n", "at least one cell, divergence and seed"),
    "unknown-divergence": (_GRID + "divergences: [foo]\n", "divergence 'foo'"),
    "alpha-without-value": (_GRID + "divergences: [alpha]\n", "divergence 'alpha'"),
    "no-seeds": (_GRID + "seeds: []\n", "at least one cell, divergence and seed"),
    "seed-negative": (_GRID + "seeds: [-1]\n", "seeds must be ≥ 0"),
    "seed-twice": (_GRID + "seeds: [0, 0]\n", "seeds repeat"),
    "steps-str": (_GRID + "steps: many\n", "'steps'"),
    "steps-0": (_GRID + "steps: 0\n", "steps (0)"),
    "eval-points": (_GRID + "steps: 10\neval_points: 3\n", "eval_points (3)"),
    "eval-samples-0": (_GRID + "eval_samples: 0\n", "eval_samples (0)"),
    "prompts-0": (_GRID + "prompts: 0\n", "prompts (0)"),
    "task-missing": (_GRID.replace("SMOKE", "configs/nope.yaml"), "configs/nope.yaml"),
    "bad-override": (_GRID + "overrides: [trian.steps=3]\n", "'trian.steps'"),
    "corpus-missing": (_GRID + "corpus: /nonexistent/corpus\n", "corpus"),
}

# (id, argv after `fdpg-scale`, world size for the pre-start checks, what the one line must contain).
# "{x}" in argv is filled from the `files` fixture; every train row also gets model.path={model} unless set.
TRAIN_ROWS = [
    # ---- LoRA (model.lora) and what it rules out
    ("lora-r-0", ["model.lora.r=0"], 1, "model.lora.r"),
    ("lora-r-str", ["model.lora.r=eight"], 1, "model.lora.r"),
    ("lora-alpha-neg", ["model.lora.r=8", "model.lora.alpha=-2"], 1, "model.lora.alpha"),
    ("lora-dropout-neg", ["model.lora.r=8", "model.lora.dropout=-0.1"], 1, "model.lora.dropout"),
    ("lora-dropout-1", ["model.lora.r=8", "model.lora.dropout=1"], 1, "model.lora.dropout"),
    ("lora-targets-absent", ["model.lora.r=8", "model.lora.target_modules=[q_proj]"], 1, "q_proj"),
    ("lora-targets-head", ["model.lora.r=8", "model.lora.target_modules=[lm_head]"], 1, "lm_head"),
    ("lora-unknown-key", ["model.lora.rank=4"], 1, "model.lora.rank"),
    ("lora-with-inference-copies", ["model.lora.r=8", "train.inference_copies=true"], 1,
     "train.inference_copies"),
    # ---- trackers, the samples table and in-run evaluation
    ("trackers-unknown", ["logging.trackers=[comet]"], 1, "logging.trackers"),
    ("trackers-twice", ["logging.trackers=[tensorboard,tensorboard]"], 1, "logging.trackers"),
    ("trackers-not-installed", ["logging.trackers=[trackio]"], 1, "trackio"),
    ("wandb-mode-bad", ["logging.wandb_mode=cloudy"], 1, "logging.wandb_mode"),
    ("samples-every-neg", ["logging.samples_every=-1"], 1, "logging.samples_every"),
    ("samples-every-str", ["logging.samples_every=often"], 1, "logging.samples_every"),
    ("eval-every-neg", ["eval.every=-1"], 1, "eval.every"),
    ("in-run-eval-samples-0", ["eval.every=2", "eval.samples=0"], 1, "eval.samples"),
    # ---- prompt datasets
    ("prompts-dataset-missing", ["target.prompts={root}/none.parquet"], 1, "none.parquet"),
    # ---- the config loader: types, ranges, choices, unknown keys
    ("steps-0", ["train.steps=0"], 1, "train.steps"),
    ("steps-neg", ["train.steps=-1"], 1, "train.steps"),
    ("steps-str", ["train.steps=abc"], 1, "train.steps"),
    ("steps-float", ["train.steps=1.5"], 1, "train.steps"),
    ("global-batch-0", ["train.global_batch=0"], 1, "train.global_batch"),
    ("micro-batch-0", ["train.micro_batch=0"], 1, "train.micro_batch"),
    ("micro-batch-neg", ["train.micro_batch=-2"], 1, "train.micro_batch"),
    ("lr-0", ["train.lr=0"], 1, "train.lr"),
    ("lr-neg", ["train.lr=-1e-3"], 1, "train.lr"),
    ("lr-inf", ["train.lr=inf"], 1, "train.lr"),
    ("lr-yaml-inf", ["train.lr=.inf"], 1, "train.lr"),
    ("lr-nan", ["train.lr=.nan"], 1, "train.lr"),
    ("lr-str", ["train.lr=fast"], 1, "train.lr"),
    ("weight-decay-neg", ["train.weight_decay=-0.1"], 1, "train.weight_decay"),
    ("weight-decay-inf", ["train.weight_decay=inf"], 1, "train.weight_decay"),
    ("grad-clip-neg", ["train.grad_clip=-1"], 1, "train.grad_clip"),
    ("grad-clip-inf", ["train.grad_clip=inf"], 1, "train.grad_clip"),
    ("warmup-neg", ["train.warmup_steps=-1"], 1, "train.warmup_steps"),
    ("schedule-unknown", ["train.lr_schedule=linear"], 1, "train.lr_schedule"),
    ("cosine-warmup-eq-steps", ["train.lr_schedule=cosine", "train.warmup_steps=6"], 1, "train.warmup_steps"),
    ("cosine-warmup-gt-steps", ["train.lr_schedule=cosine", "train.warmup_steps=10"], 1, "train.warmup_steps"),
    ("momentum-1", ["train.baseline_momentum=1.0"], 1, "train.baseline_momentum"),
    ("momentum-neg", ["train.baseline_momentum=-0.1"], 1, "train.baseline_momentum"),
    ("baseline-str", ["train.baseline=maybe"], 1, "train.baseline"),
    ("on-policy-int", ["train.on_policy=2"], 1, "train.on_policy"),
    ("proposal-interval-0", ["train.proposal_update_interval=0"], 1, "train.proposal_update_interval"),
    ("proposal-metric", ["train.proposal_update_metric=js"], 1, "train.proposal_update_metric"),
    ("save-every-0", ["train.save_every=0"], 1, "train.save_every"),
    ("keep-0", ["train.keep_checkpoints=0"], 1, "train.keep_checkpoints"),
    ("on-nonfinite", ["train.on_nonfinite=ignore"], 1, "train.on_nonfinite"),
    ("max-skips-0", ["train.max_consecutive_skips=0"], 1, "train.max_consecutive_skips"),
    ("train-unknown-key", ["train.stepz=1"], 1, "train.stepz"),
    ("train-not-section", ["train=3"], 1, "train"),
    ("divergence-unknown", ["divergence.name=foo"], 1, "divergence.name"),
    ("alpha-missing", ["divergence.name=alpha"], 1, "divergence.alpha"),
    ("alpha-1", ["divergence.name=alpha", "divergence.alpha=1"], 1, "divergence.alpha"),
    ("alpha-0", ["divergence.name=alpha", "divergence.alpha=0"], 1, "divergence.alpha"),
    ("alpha-for-js", ["divergence.alpha=0.5"], 1, "divergence.alpha"),
    ("clip-0", ["divergence.clip=0"], 1, "divergence.clip"),
    ("clip-neg", ["divergence.clip=-1"], 1, "divergence.clip"),
    ("clip-inf", ["divergence.clip=inf"], 1, "divergence.clip"),
    ("divergence-unknown-key", ["divergence.bogus=1"], 1, "divergence.bogus"),
    ("kind-unknown", ["target.kind=foo"], 1, "target.kind"),
    ("moment-missing", ["target.kind=distributional"], 1, "target.moment"),
    ("moment-inf", ["target.kind=distributional", "target.moment=inf"], 1, "target.moment"),
    ("beta-0", ["target.beta=0"], 1, "target.beta"),
    ("beta-neg", ["target.beta=-1"], 1, "target.beta"),
    ("beta-inf", ["target.beta=inf"], 1, "target.beta"),
    ("fit-samples-0", ["target.fit_samples=0"], 1, "target.fit_samples"),
    ("distributional-conditional", ["target.kind=distributional", "target.moment=0.5",
                                    "target.prompts_file=x.jsonl"], 1, "target.prompts_file"),
    ("scorer-args-not-map", ["target.scorer_args=3"], 1, "target.scorer_args"),
    ("max-new-tokens-0", ["sampling.max_new_tokens=0"], 1, "sampling.max_new_tokens"),
    ("max-new-tokens-neg", ["sampling.max_new_tokens=-5"], 1, "sampling.max_new_tokens"),
    ("temperature-0", ["sampling.temperature=0"], 1, "sampling.temperature"),
    ("temperature-neg", ["sampling.temperature=-1"], 1, "sampling.temperature"),
    ("temperature-inf", ["sampling.temperature=inf"], 1, "sampling.temperature"),
    ("top-k-neg", ["sampling.top_k=-1"], 1, "sampling.top_k"),
    ("top-p-0", ["sampling.top_p=0"], 1, "sampling.top_p"),
    ("top-p-big", ["sampling.top_p=1.5"], 1, "sampling.top_p"),
    ("generation-mode", ["sampling.generation_mode=fast"], 1, "sampling.generation_mode"),
    ("dtype-fp16", ["model.dtype=fp16"], 1, "model.dtype"),
    ("build-unknown", ["model.build=tiny-bert"], 1, "model.build"),
    ("build-seed-neg", ["model.build_seed=-1"], 1, "model.build_seed"),
    ("model-path-empty", ["model.path="], 1, "model.path"),
    ("seed-neg", ["seed=-1"], 1, "'seed'"),
    ("seed-str", ["seed=abc"], 1, "'seed'"),
    ("seed-huge", ["seed=9223372036854775808"], 1, "'seed'"),
    ("output-dir-none", ["output_dir="], 1, "output_dir"),
    ("summary-every-0", ["logging.summary_every=0"], 1, "logging.summary_every"),
    ("tensorboard-int", ["logging.tensorboard=3"], 1, "logging.tensorboard"),
    ("progress-bar-str", ["logging.progress_bar=hello"], 1, "logging.progress_bar"),
    ("override-no-equals", ["nokey"], 1, "'nokey'"),
    ("top-level-unknown", ["foo=1"], 1, "'foo'"),
    ("not-a-section", ["model.path.sub=1"], 1, "model.path"),
    # ---- config files
    ("config-missing", ["--config", "{root}/nope.yaml"], 1, "nope.yaml"),
    ("config-bad-yaml", ["--config", "{root}/bad.yaml"], 1, "bad.yaml"),
    ("config-list", ["--config", "{root}/list.yaml"], 1, "list.yaml"),
    ("config-python-tag", ["--config", "{root}/pickle.yaml"], 1, "pickle.yaml"),
    ("config-unknown-section", ["--config", "{root}/typo.yaml"], 1, "'trian'"),
    # ---- pre-start checks: world size, model directory, tokenizer, positions, files
    ("world-2-indivisible", ["train.global_batch=6"], 2, "train.global_batch"),
    ("world-3-indivisible", [], 3, "train.global_batch"),
    ("world-2-micro", ["train.global_batch=4"], 2, "train.global_batch"),
    ("model-missing", ["model.path={root}/absent", "model.build="], 1, "model.path"),
    ("model-is-file", ["model.path={not_a_dir}", "model.build="], 1, "model.path"),
    ("model-no-config", ["model.path={no_config}", "model.build="], 1, "no config.json"),
    ("model-not-causal", ["model.path={bert}", "model.build="], 1, "not a causal LM"),
    ("model-no-weights", ["model.path={no_weights}", "model.build="], 1, "no weights"),
    ("model-missing-shard", ["model.path={missing_shard}", "model.build="], 1, "model-00002-of-00002"),
    ("model-bad-index", ["model.path={bad_index}", "model.build="], 1, "model.safetensors.index.json"),
    ("model-no-tokenizer", ["model.path={no_tokenizer}", "model.build="], 1, "no tokenizer files"),
    ("tokenizer-no-pad-no-eos", ["model.path={no_pad}", "model.build="], 1, "neither a pad token nor an EOS"),
    ("tokenizer-too-big", ["model.path={small_vocab}", "model.build="], 1, "vocab_size=100"),
    ("build-over-other-seed", ["model.build_seed=1"], 1, "seed 1"),
    ("build-over-foreign-dir", ["model.path={no_weights}"], 1, "no_weights"),
    ("positions-exceeded", ["sampling.max_new_tokens=64"], 1, "sampling.max_new_tokens=64"),
    ("positions-far-exceeded", ["sampling.max_new_tokens=100000"], 1, "sampling.max_new_tokens"),
    ("prompts-missing", ["target.prompts_file={root}/none.jsonl"], 1, "target.prompts_file"),
    ("prompts-bad-json", ["target.prompts_file={root}/prompts_bad.jsonl"], 1, "line 2"),
    ("prompts-empty", ["target.prompts_file={root}/prompts_empty.jsonl"], 1, "holds no prompt"),
    ("prompts-no-key", ["target.prompts_file={root}/prompts_nokey.jsonl"], 1, "line 1"),
    ("prompts-too-long", ["target.prompts_file={root}/prompts_long.jsonl", "sampling.max_new_tokens=40"], 1,
     "the longest prompt"),
    ("scorer-unknown", ["target.scorer=nope"], 1, "target.scorer"),
    ("scorer-args-missing", ["target.scorer_args={{}}"], 1, "target.scorer_args"),
    ("scorer-args-extra", ["target.scorer_args={{substring: e, extra: 1}}"], 1, "target.scorer_args"),
    ("ds-missing", ["deepspeed.config={root}/none.json"], 1, "deepspeed.config"),
    ("ds-bad-json", ["deepspeed.config={root}/ds_bad.json"], 1, "ds_bad.json"),
    ("ds-auto", ["deepspeed.config={root}/ds_auto.json"], 1, "\"auto\""),
    ("ds-stage-2", ["deepspeed.config={root}/ds_stage2.json"], 1, "zero_optimization.stage"),
    ("ds-batch-mismatch", ["deepspeed.config={root}/ds_batch.json"], 1, "train_batch_size"),
    ("ds-bf16-contradiction", ["deepspeed.config={root}/ds_bf16.json"], 1, "model.dtype"),
    ("output-dir-under-file", ["output_dir={not_a_dir}/run"], 1, "output_dir"),
    # ---- the process group
    ("timeout-0", ["distributed.timeout_s=0"], 1, "distributed.timeout_s"),
    ("timeout-neg", ["distributed.timeout_s=-5"], 1, "distributed.timeout_s"),
    ("timeout-inf", ["distributed.timeout_s=inf"], 1, "distributed.timeout_s"),
    ("timeout-nan", ["distributed.timeout_s=.nan"], 1, "distributed.timeout_s"),
    ("timeout-str", ["distributed.timeout_s=soon"], 1, "distributed.timeout_s"),
    ("distributed-unknown-key", ["distributed.backend=nccl"], 1, "distributed.backend"),
]

PLAN_ROWS = [
    ("plan-nodes-0", ["--nodes", "0", "--gpus-per-node", "8"], "--nodes"),
    ("plan-nodes-neg", ["--nodes", "-1", "--gpus-per-node", "8"], "--nodes"),
    ("plan-gpus-neg", ["--nodes", "1", "--gpus-per-node", "-3"], "--gpus-per-node"),
    ("plan-gpus-0", ["--nodes", "2", "--gpus-per-node", "0"], "--gpus-per-node"),
    ("plan-prompt-tokens-neg", ["--nodes", "1", "--gpus-per-node", "1", "--prompt-tokens", "-1"], "--prompt-tokens"),
    ("plan-gpu-memory-0", ["--nodes", "1", "--gpus-per-node", "1", "--gpu-memory-gib", "0"], "--gpu-memory-gib"),
    ("plan-reserve-neg", ["--nodes", "1", "--gpus-per-node", "1", "--reserve-gib", "-1"], "--reserve-gib"),
    ("plan-reserve-inf", ["--nodes", "1", "--gpus-per-node", "1", "--reserve-gib", "inf"], "--reserve-gib"),
    ("plan-gpu-memory-neg", ["--nodes", "1", "--gpus-per-node", "1", "--gpu-memory-gib", "-3"], "--gpu-memory-gib"),
    ("plan-indivisible", ["--nodes", "3", "--gpus-per-node", "1"], "train.global_batch=128"),
    ("plan-override-unknown", ["--nodes", "1", "--gpus-per-node", "1", "trian.x=1"], "'trian.x'"),
    ("plan-override-bad", ["--nodes", "1", "--gpus-per-node", "1", "train.steps=0"], "train.steps"),
    ("plan-override-timeout", ["--nodes", "1", "--gpus-per-node", "1", "distributed.timeout_s=0"],
     "distributed.timeout_s"),
]

# (id, argv after `fdpg-scale`, what the one line must contain); "{x}" is filled from the `entry_files` fixture.
OTHER_ROWS = [
    # ---- train --nproc-per-node: checked for N ranks before torchrun starts
    ("nproc-0", ["train", "--config", "{smoke}", "--nproc-per-node", "0"], "--nproc-per-node"),
    ("nproc-str", ["train", "--config", "{smoke}", "--nproc-per-node", "two"], "--nproc-per-node"),
    ("nproc-indivisible", ["train", "--config", "{smoke}", "--nproc-per-node", "2", "train.global_batch=12",
                           "train.micro_batch=4", "output_dir={root}/nproc"], "train.global_batch=12"),
    ("nproc-unknown-key", ["train", "--config", "{smoke}", "--nproc-per-node", "2", "trian.steps=2",
                           "output_dir={root}/nproc"], "'trian.steps'"),
    # ---- plan: the config file itself
    ("plan-config-missing", ["plan", "--config", "{root}/none.yaml", "--nodes", "1", "--gpus-per-node", "1"],
     "none.yaml"),
    ("plan-config-bad-yaml", ["plan", "--config", "{root}/bad.yaml", "--nodes", "1", "--gpus-per-node", "1"],
     "bad.yaml"),
    # ---- export: what it reads
    ("export-missing-dir", ["export", "{root}/absent", "--to", "{root}/hf1"], "has no checkpoint"),
    ("export-no-checkpoints", ["export", "{empty}", "--to", "{root}/hf2"], "has no checkpoint"),
    ("export-empty-checkpoints", ["export", "{no_ckpt}", "--to", "{root}/hf3"], "has no checkpoint"),
    ("export-a-file", ["export", "{file}", "--to", "{root}/hf4"], "has no checkpoint"),
    ("export-not-ours", ["export", "{foreign}", "--to", "{root}/hf5"], "not a checkpoint written by"),
    ("export-damaged", ["export", "{damaged}", "--to", "{root}/hf6"], "step_00000002"),
    # ---- eval: options and what it reads
    ("eval-missing-dir", ["eval", "{root}/absent"], "config.yaml"),
    ("eval-no-config", ["eval", "{empty}"], "config.yaml"),
    ("eval-a-file", ["eval", "{file}"], "config.yaml"),
    ("eval-no-checkpoint", ["eval", "{no_ckpt}"], "has no checkpoint to evaluate"),
    ("eval-not-ours", ["eval", "{foreign}"], "not a checkpoint written by"),
    ("eval-samples-0", ["eval", "{no_ckpt}", "--samples", "0"], "--samples"),
    ("eval-samples-neg", ["eval", "{no_ckpt}", "--samples", "-4"], "--samples"),
    ("eval-base-samples-0", ["eval", "{no_ckpt}", "--base-samples", "0"], "--base-samples"),
    ("eval-seed-neg", ["eval", "{no_ckpt}", "--seed", "-1"], "--seed"),
    ("eval-bad-config", ["eval", "{bad_run}"], "train.steps"),
    # ---- sweep: checked before any run starts
    ("sweep-config-missing", ["sweep", "--configs", "{root}/none.yaml"], "none.yaml"),
    ("sweep-config-bad-yaml", ["sweep", "--configs", "{root}/bad.yaml"], "bad.yaml"),
    ("sweep-divergence-unknown", ["sweep", "--configs", "{smoke}", "--divergences", "foo"], "divergence.name"),
    ("sweep-alpha-without-value", ["sweep", "--configs", "{smoke}", "--divergences", "alpha"], "divergence.alpha"),
    ("sweep-alpha-not-a-number", ["sweep", "--configs", "{smoke}", "--divergences", "alpha:x"], "divergence.alpha"),
    ("sweep-alpha-1", ["sweep", "--configs", "{smoke}", "--divergences", "alpha:1"], "divergence.alpha"),
    ("sweep-divergence-twice", ["sweep", "--configs", "{smoke}", "--divergences", "kl", "kl"], "repeats"),
    ("sweep-nproc-0", ["sweep", "--configs", "{smoke}", "--nproc", "0"], "--nproc"),
    ("sweep-eval-samples-0", ["sweep", "--configs", "{smoke}", "--eval-samples", "0"], "--eval-samples"),
    ("sweep-override-unknown", ["sweep", "trian.steps=3", "--configs", "{smoke}"], "'trian.steps'"),
    ("sweep-override-bad-value", ["sweep", "train.steps=0", "--configs", "{smoke}"], "train.steps"),
    ("sweep-override-timeout", ["sweep", "distributed.timeout_s=-1", "--configs", "{smoke}"], "distributed.timeout_s"),
    ("sweep-second-config-bad", ["sweep", "--configs", "{smoke}", "{root}/list.yaml"], "list.yaml"),
    ("sweep-out-is-a-file", ["sweep", "--configs", "{smoke}", "--out", "{file}"], "File exists"),
    # ---- reproduce --grid: the grid file
    ("grid-missing", ["reproduce", "--grid", "{root}/none.yaml", "--count"], "none.yaml"),
    ("grid-bad-yaml", ["reproduce", "--grid", "{root}/bad.yaml", "--count"], "bad.yaml"),
    ("grid-a-list", ["reproduce", "--grid", "{root}/list.yaml", "--count"], "list.yaml"),
    *[(f"grid-{name}", ["reproduce", "--grid", f"{{grid_{name}}}", "--count"], culprit)
      for name, (_, culprit) in GRIDS.items()],
]


def test_the_table_holds_at_least_150_distinct_cases():
    ids = [r[0] for rows in (TRAIN_ROWS, PLAN_ROWS, OTHER_ROWS, PROCESS_ROWS, COMMAND_PROCESS_ROWS) for r in rows]
    assert len(ids) == len(set(ids)) and len(ids) >= 150, len(ids)


@pytest.mark.parametrize("case, args, world, culprit", TRAIN_ROWS, ids=[r[0] for r in TRAIN_ROWS])
def test_train_rejects_in_one_line(case, args, world, culprit, files, tmp_path, monkeypatch, capsys):
    # Everything `train` does before it starts an engine, for this row's world size.
    monkeypatch.setattr(loop, "train", lambda cfg: preflight(cfg, world_size=world))
    args = fill_paths(args, files)
    config = args[1] if args[:1] == ["--config"] else str(SMOKE)
    overrides = args[2:] if args[:1] == ["--config"] else args
    defaults = [f"model.path={files['model']}", f"output_dir={tmp_path / 'run'}"]
    defaults = [d for d in defaults if not any(o.startswith(d.split("=")[0] + "=") for o in overrides)]
    capsys.readouterr()
    status = cli.main(["train", "--config", config, *defaults, *overrides])
    line = one_line(capsys.readouterr().err)
    assert status == EXIT_BAD_INPUT, (status, line)
    assert culprit in line, line


@pytest.mark.parametrize("case, args, culprit", PLAN_ROWS, ids=[r[0] for r in PLAN_ROWS])
def test_plan_rejects_in_one_line(case, args, culprit, capsys):
    capsys.readouterr()
    status = cli.main(["plan", "--config", str(ROOT / "configs" / "gpt2-124m.yaml"), *args])
    line = one_line(capsys.readouterr().err)
    assert status == EXIT_BAD_INPUT and culprit in line, (status, line)


@pytest.fixture(scope="module")
def entry_files(tmp_path_factory):
    """Run directories and grid files for the commands other than train: none holds a usable checkpoint."""
    root = tmp_path_factory.mktemp("entry")
    f = {"root": root, "smoke": SMOKE, "file": root / "file.txt", "empty": root / "empty",
         "no_ckpt": root / "no_ckpt", "foreign": root / "foreign", "damaged": root / "damaged",
         "bad_run": root / "bad_run"}
    f["file"].write_text("x")
    f["empty"].mkdir()
    for run in ("no_ckpt", "foreign", "damaged", "bad_run"):
        (f[run] / "checkpoints").mkdir(parents=True)
        (f[run] / "config.yaml").write_text(SMOKE.read_text())
    (f["bad_run"] / "config.yaml").write_text(SMOKE.read_text().replace("steps: 6", "steps: 0"))
    step = f["foreign"] / "checkpoints" / "step_00000002"   # a meta.json, but nothing fdpg-scale writes beside it
    step.mkdir()
    (step / "meta.json").write_text(json.dumps({"step": 2, "fingerprint": {}}))
    step = f["damaged"] / "checkpoints" / "step_00000002"   # recorded sizes and hashes that the files fail
    (step / "hf").mkdir(parents=True)
    (step / "hf" / "config.json").write_text("{}")
    (step / "meta.json").write_text(json.dumps({"step": 2, "fingerprint": {}, "files": {"hf/config.json": [9, "0" * 64]}}))
    for name, body in {"bad.yaml": "train: [1, 2\n", "list.yaml": "- 1\n- 2\n"}.items():
        (root / name).write_text(body)
    for name, (text, _) in GRIDS.items():
        f[f"grid_{name}"] = root / f"grid_{name}.yaml"
        f[f"grid_{name}"].write_text(text.replace("SMOKE", str(SMOKE)))
    return f


@pytest.mark.parametrize("case, args, culprit", OTHER_ROWS, ids=[r[0] for r in OTHER_ROWS])
def test_other_commands_reject_in_one_line(case, args, culprit, entry_files, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)       # the grids' task configs are relative to the current directory
    capsys.readouterr()
    status = cli.main(fill_paths(args, entry_files))
    line = one_line(capsys.readouterr().err)
    assert status == EXIT_BAD_INPUT and culprit in line, (status, line)


def test_a_second_run_seed_reuses_the_built_model(files, tmp_path):
    """seed=1 after seed=0: the build has its own seed (model.build_seed), so the cached model is reused."""
    from fdpg_scale.training.config import load_config

    for seed in (0, 1):
        cfg = load_config(SMOKE, [f"model.path={files['model']}", f"output_dir={tmp_path}", f"seed={seed}"])
        assert preflight(cfg, world_size=1) == files["model"]


# ------------------------------------------------------------------------------------------- processes
# (id, ranks (2: under torchrun), overrides, culprit). The whole `train` path runs, process group included.
PROCESS_ROWS = [
    ("process-no-weights", 1, ["model.path={no_weights}", "model.build="], "no weights"),
    ("torchrun-2-indivisible", 2, ["train.global_batch=12"], "train.global_batch=12"),
    ("process-unreachable-moment", 1, ["target.kind=distributional", "target.moment=1.5", "target.fit_samples=8",
                                       "train.steps=1"], "target.moment=1.5"),
]


# (id, argv after `fdpg-scale`, culprit): the other commands through the installed console script.
COMMAND_PROCESS_ROWS = [
    ("process-export-not-ours", ["export", "{foreign}", "--to", "{root}/hf"], "not a checkpoint written by"),
    ("process-eval-samples-0", ["eval", "{no_ckpt}", "--samples", "0"], "--samples"),
    ("process-sweep-unknown-divergence", ["sweep", "--configs", "{smoke}", "--divergences", "foo"], "divergence.name"),
    ("process-grid-unknown-divergence", ["reproduce", "--grid", "{grid_unknown-divergence}", "--count"],
     "divergence 'foo'"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case, args, culprit", COMMAND_PROCESS_ROWS, ids=[r[0] for r in COMMAND_PROCESS_ROWS])
def test_other_commands_in_a_real_process_print_one_line(case, args, culprit, entry_files):
    proc = run_cli(*fill_paths(args, entry_files), console_script=True, check=False, timeout=300)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-3000:]
    assert culprit in one_line(proc.stderr), proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case, nproc, overrides, culprit", PROCESS_ROWS, ids=[r[0] for r in PROCESS_ROWS])
def test_real_processes_print_the_line_once(case, nproc, overrides, culprit, files, tmp_path):
    args = ["train", "--config", str(SMOKE), f"output_dir={tmp_path / 'run'}",
            "logging.progress_bar=false", "logging.tensorboard=false", *fill_paths(overrides, files)]
    if not any(o.startswith("model.path=") for o in overrides):
        args.append(f"model.path={files['model']}")
    proc = run_cli(*args, nproc=nproc, check=False)
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("fdpg-scale:")]
    assert len(ours) == 1, f"expected our line once, got {ours}\n{proc.stderr[-3000:]}"
    assert culprit in ours[0], ours[0]
    if nproc > 1:  # torchrun exits 1 whatever its workers did; its failure report names their status
        assert proc.returncode != 0 and re.search(rf"exitcode\s*:\s*{EXIT_BAD_INPUT}\b", proc.stderr), proc.stderr[-3000:]
        assert proc.stderr.count("Traceback") <= 1, proc.stderr[-3000:]  # torchrun's own, none from the ranks
    else:
        assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
