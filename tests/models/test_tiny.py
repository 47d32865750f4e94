"""The tiny model builder: deterministic, cached, loadable, tied (GPT-2) / untied (Llama) heads."""

from __future__ import annotations

import hashlib

import pytest
import torch

from fdpg_scale.models.tiny import build_tiny_model_dir


def _digest(d):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_build_is_deterministic_cached_and_loads(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = build_tiny_model_dir(tmp_path / "a", arch, seed=0)
    b = build_tiny_model_dir(tmp_path / "b", arch, seed=0)
    assert _digest(a) == _digest(b)
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model_dir(a, arch, seed=0) == a and (a / "model.safetensors").stat().st_mtime_ns == mtime
    c = build_tiny_model_dir(tmp_path / "c", arch, seed=1)
    assert _digest(c)["model.safetensors"] != _digest(a)["model.safetensors"]
    assert _digest(c)["tokenizer.json"] == _digest(a)["tokenizer.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left

    tok = AutoTokenizer.from_pretrained(a)
    model = AutoModelForCausalLM.from_pretrained(a)
    assert model.config.vocab_size == len(tok)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    text = "def add(self, amount=1):\n    return x"
    assert tok.decode(tok(text)["input_ids"]) == text
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (arch == "gpt2")
    out = model.generate(torch.tensor([[tok.bos_token_id]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 5)


def test_refuses_to_overwrite_other_directories(tmp_path):
    build_tiny_model_dir(tmp_path / "m", "gpt2", seed=0)
    with pytest.raises(FileExistsError, match="not a tiny llama"):
        build_tiny_model_dir(tmp_path / "m", "llama", seed=0)
    with pytest.raises(ValueError, match="arch"):
        build_tiny_model_dir(tmp_path / "x", "bert")
