"""Prompts files of conditional targets: read, tokenised with BOS first, drawn reproducibly; errors name the line."""

import pytest

from fdpg_scale.training.config import ConfigError
from fdpg_scale.training.prompts import load_prompts


class ByteTokenizer:
    bos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [b + 3 for b in text.encode()]}


def test_prompts_are_tokenised_and_drawn_reproducibly(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ab"}\n\n{"prompt": "def f():\\n"}\n')
    prompts = load_prompts(path, ByteTokenizer())
    assert prompts.texts == ("ab", "def f():\n")
    assert prompts.token_ids[0] == (0, ord("a") + 3, ord("b") + 3)
    assert (prompts.draw(16, seed=5) == prompts.draw(16, seed=5)).all()
    assert set(prompts.draw(200, seed=1).tolist()) == {0, 1}


@pytest.mark.parametrize("content, needle", [("", "holds no prompt"), ("not json\n", "line 1"),
                                             ('{"text": "x"}\n', "line 1"), ('{"prompt": ""}\n', "non-empty")])
def test_bad_prompts_file(tmp_path, content, needle):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=needle):
        load_prompts(path, ByteTokenizer())
    with pytest.raises(ConfigError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl", ByteTokenizer())
