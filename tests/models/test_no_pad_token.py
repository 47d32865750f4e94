"""A model directory whose tokenizer defines no pad token (as GPT-2's and Llama's real ones) trains, evaluates
and exports: padding falls back to EOS, and the masks say which tokens are real.

The directory is the tiny GPT-2 with its pad token removed from the tokenizer and model files (the token
stays in the vocabulary, unnamed, as in GPT-2's). Every command runs as a user would start it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fdpg_scale.models.tiny import build_tiny_model_dir
from fdpg_scale.models.tokens import padding_id
from tests.harness import SMOKE, run_cli


def strip_pad_token(model_dir: Path) -> None:
    """Remove every mention of the pad token from a HF directory's tokenizer and model config files."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = model_dir / name
        if path.is_file():
            data = json.loads(path.read_text())
            data.pop("pad_token", None)
            path.write_text(json.dumps(data, indent=1))
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        if path.is_file():
            data = json.loads(path.read_text())
            data.pop("pad_token_id", None)
            path.write_text(json.dumps(data, indent=1))


def test_padding_id_falls_back_to_eos_and_names_a_tokenizer_without_either():
    class Tok:
        name_or_path = "some/model"

        def __init__(self, pad, eos):
            self.pad_token_id, self.eos_token_id = pad, eos

    assert padding_id(Tok(2, 1)) == 2 and padding_id(Tok(None, 1)) == 1
    with pytest.raises(ValueError, match="'some/model' defines neither a pad token nor an EOS token"):
        padding_id(Tok(None, None))


@pytest.mark.slow
def test_train_eval_export_with_a_tokenizer_without_pad_token(tmp_path):
    from transformers import AutoTokenizer

    model = build_tiny_model_dir(tmp_path / "nopad", "gpt2")
    strip_pad_token(model)
    tok = AutoTokenizer.from_pretrained(model)
    assert tok.pad_token_id is None and tok.eos_token_id is not None  # what a real GPT-2 directory looks like

    out = tmp_path / "run"
    run_cli("train", "--config", str(SMOKE), f"model.path={model}", "model.build=null", f"output_dir={out}",
         "train.steps=2", "train.save_every=2", "logging.progress_bar=false", "logging.tensorboard=false")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    run_cli("eval", str(out), "--samples", "8")
    assert json.loads((out / "eval.json").read_text())
    run_cli("export", str(out), "--to", str(tmp_path / "hf"))
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").pad_token_id is None
