"""Stand-ins for what a user brings, built locally in seconds: a chat model directory and a prompt set.

    python examples/build_user_data.py OUT_DIR

writes ``OUT_DIR/chat-model``, the project's tiny GPT-2 (random weights) made to look like a Qwen chat model:
its tokenizer has no BOS token and carries a small Jinja chat template; ``OUT_DIR/prompts.parquet``, prompts
in a ``question`` column with a reference ``answer`` column (what ``examples.my_scorers:mentions_answer``
reads); and ``OUT_DIR/reward-model``, a GPT-2 reward model (a sequence classifier with one output, random
weights) with the same tokenizer and template, as ``target.scorer: hf-reward-model`` reads one. README, "Your
own model and data", trains on them.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

# A chat template in the style of Qwen's ChatML, kept short for the tiny model's 64 positions.
CHAT_TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|bos|>assistant:{% endif %}")
# Answers of one letter, so that even the random tiny model writes them now and then.
PROMPTS = {"question": ["Name a vowel.", "Which letter ends 'class'?", "A letter of 'json'?"],
           "answer": ["e", "s", "o"]}


def build_chat_model(path: Path) -> Path:
    """The tiny GPT-2 at ``path`` with the BOS token removed from its tokenizer and a chat template added."""
    from transformers import AutoTokenizer

    from fdpg_scale.models.tiny import build_tiny_model_dir

    scratch = path.with_name(path.name + ".base")
    build_tiny_model_dir(scratch, "gpt2")
    shutil.copytree(scratch, path, dirs_exist_ok=True)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # no BOS, as Qwen's tokenizer
        if (path / name).is_file():
            data = json.loads((path / name).read_text())
            data.pop("bos_token", None)
            (path / name).write_text(json.dumps(data, indent=1))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def build_reward_model(path: Path, tokenizer_dir: Path) -> Path:
    """A one-output GPT2ForSequenceClassification (a reward head, random weights) with ``tokenizer_dir``'s
    tokenizer (and so its chat template), saved at ``path``."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer), num_labels=1,
                        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory to write chat-model/, prompts.parquet and reward-model/ into")
    out = parser.parse_args().out
    import datasets

    out.mkdir(parents=True, exist_ok=True)
    print(build_chat_model(out / "chat-model"))
    datasets.Dataset.from_dict(PROMPTS).to_parquet(str(out / "prompts.parquet"))
    print(out / "prompts.parquet")
    print(build_reward_model(out / "reward-model", out / "chat-model"))


if __name__ == "__main__":
    main()
