"""A user's own model and data, as they arrive: tokenizers without BOS (Qwen-style), prompt datasets with
metadata columns, chat templates and Hub ids read from the local cache.

Every model here is the tiny GPT-2 built on the spot, edited as a user's would differ (no BOS token, a chat
template); every command runs as a user would start it (``fdpg-scale ...`` through ``fdpg_scale.cli``). Bad
inputs are a table of one-line errors, as in tests/test_bad_inputs.py: ``train`` runs its pre-start checks
(``training/preflight.py``) in-process instead of starting the engines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fdpg_scale import cli
from fdpg_scale.errors import EXIT_BAD_INPUT
from fdpg_scale.models.tiny import build_tiny_model_dir
from fdpg_scale.models.tokens import padding_id, special_token_problem, start_id
from fdpg_scale.training import loop
from fdpg_scale.training.preflight import preflight

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"


def strip_special_tokens(model_dir: Path, *names: str) -> None:
    """Remove every mention of the special tokens ``names`` ("bos", "eos", "pad") from a HF directory's tokenizer
    and model config files (the tokens stay in the vocabulary, unnamed, as Qwen's has no BOS)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = model_dir / name
        if path.is_file():
            data = json.loads(path.read_text())
            for token in names:
                data.pop(f"{token}_token", None)
            path.write_text(json.dumps(data, indent=1))
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        if path.is_file():
            data = json.loads(path.read_text())
            for token in names:
                data.pop(f"{token}_token_id", None)
            path.write_text(json.dumps(data, indent=1))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny model, copies of it with special tokens removed, and prompt files."""
    root = tmp_path_factory.mktemp("user_data")
    model = build_tiny_model_dir(root / "model", "gpt2", seed=0)

    def variant(name, *tokens):
        d = root / name
        shutil.copytree(model, d)
        strip_special_tokens(d, *tokens)
        return d

    f = {"root": root, "model": model, "no_bos": variant("no_bos", "bos"),
         "no_bos_no_eos": variant("no_bos_no_eos", "bos", "eos"),
         "no_special": variant("no_special", "bos", "eos", "pad")}
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("def f(", "import ")))
    return f


# ------------------------------------------------------------------------------------- special tokens
class Tok:
    name_or_path = "some/model"

    def __init__(self, bos, eos, pad):
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos, eos, pad


def test_start_token_is_bos_else_eos_and_the_three_tokens_are_checked_together():
    assert start_id(Tok(0, 1, 2)) == 0 and start_id(Tok(None, 1, 2)) == 1
    assert padding_id(Tok(None, 1, None)) == 1
    with pytest.raises(ValueError, match="'some/model' defines neither a BOS token nor an EOS token"):
        start_id(Tok(None, None, 2))
    assert special_token_problem(Tok(None, 1, None)) is None  # Qwen-like: EOS stands in for both
    assert special_token_problem(Tok(0, None, 2)) is None      # no EOS: samples just run to max_new_tokens
    assert "neither a BOS token nor an EOS token" in special_token_problem(Tok(None, None, 2))
    assert "neither a pad token nor an EOS token" in special_token_problem(Tok(0, None, None))
    assert "no BOS, EOS or pad token" in special_token_problem(Tok(None, None, None))


def test_the_bos_less_copy_is_what_a_qwen_tokenizer_looks_like(files):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(files["no_bos"])
    assert tok.bos_token_id is None and tok.eos_token_id is not None and tok.pad_token_id is not None
    tok = AutoTokenizer.from_pretrained(files["no_bos_no_eos"])
    assert tok.bos_token_id is None and tok.eos_token_id is None


def test_prompts_and_unconditional_samples_start_from_eos_without_bos(files):
    """What the model is conditioned on: EOS in front of each prompt, and EOS alone for an unconditional draw."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fdpg_scale.apps.evaluate import sample_and_score
    from fdpg_scale.targets.tasks import build_task
    from fdpg_scale.training.config import TargetConfig
    from fdpg_scale.training.prompts import load_prompts

    tok = AutoTokenizer.from_pretrained(files["no_bos"])
    prompts = load_prompts(files["root"] / "prompts.jsonl", tok)
    assert [ids[0] for ids in prompts.token_ids] == [tok.eos_token_id] * 2
    assert list(prompts.token_ids[0][1:]) == tok("def f(", add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(files["no_bos"], dtype=torch.float32).eval()
    task = build_task(TargetConfig(scorer="contains", scorer_args={"substring": "e"}))
    out = sample_and_score(model, tok, task, n=3, max_new_tokens=4, seed=0)
    assert out["prompt_ids"].tolist() == [[tok.eos_token_id]] * 3


# -------------------------------------------------------------------------------- one-line bad inputs
# (id, overrides, world size, what the one line must contain); "{x}" is filled from the `files` fixture.
ROWS = [
    ("tokenizer-no-bos-no-eos", ["model.path={no_bos_no_eos}"], 1, "neither a BOS token nor an EOS token"),
    ("tokenizer-no-special-tokens", ["model.path={no_special}"], 1, "no BOS, EOS or pad token"),
]


def _fill(args: list[str], files: dict) -> list[str]:
    return [a.format(**{k: str(v) for k, v in files.items()}) for a in args]


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{err}"
    assert lines[0].startswith("fdpg-scale"), lines[0]
    return lines[0]


@pytest.mark.parametrize("case, args, world, culprit", ROWS, ids=[r[0] for r in ROWS])
def test_train_rejects_in_one_line(case, args, world, culprit, files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "train", lambda cfg: preflight(cfg, world_size=world))
    overrides = _fill(args, files)
    defaults = [f"model.path={files['model']}", "model.build=null", f"output_dir={tmp_path / 'run'}"]
    defaults = [d for d in defaults if not any(o.startswith(d.split("=")[0] + "=") for o in overrides)]
    capsys.readouterr()
    status = cli.main(["train", "--config", str(SMOKE), *defaults, *overrides])
    line = _one_line(capsys.readouterr().err)
    assert status == EXIT_BAD_INPUT, (status, line)
    assert culprit in line, line


# ---------------------------------------------------------------------------------------- processes
def _run(*args: str, env: dict | None = None) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "SLURM_PROCID")}
    base.update(OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "fdpg_scale.cli", *args], cwd=ROOT, env=base, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


TRAIN = ("train", "--config", str(SMOKE), "model.build=null", "train.steps=2", "train.save_every=2",
         "logging.progress_bar=false", "logging.tensorboard=false")


@pytest.mark.slow
def test_train_eval_export_with_a_tokenizer_without_bos(files, tmp_path):
    """Unconditional and conditional, as a Qwen tokenizer (no BOS) would be used."""
    from transformers import AutoTokenizer

    out = tmp_path / "run"
    _run(*TRAIN, f"model.path={files['no_bos']}", f"output_dir={out}")
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    _run("eval", str(out), "--samples", "8")
    assert json.loads((out / "eval.json").read_text())
    _run("export", str(out), "--to", str(tmp_path / "hf"))
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").bos_token_id is None

    conditional = tmp_path / "conditional"
    _run(*TRAIN, f"model.path={files['no_bos']}", f"output_dir={conditional}",
         f"target.prompts_file={files['root'] / 'prompts.jsonl'}")
    _run("eval", str(conditional), "--samples", "8")
    assert json.loads((conditional / "eval.json").read_text())
