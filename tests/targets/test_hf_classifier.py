"""``target.scorer: hf-classifier``: a local classifier (built here, nothing downloaded) scores like a plain
transformers forward, in batches, once per batch, frozen; every bad argument or directory is a one-line error."""

from __future__ import annotations

import pytest
import torch

from fdpg_scale.errors import ConfigError
from fdpg_scale.models.tiny_classifier import build_tiny_classifier_dir
from fdpg_scale.targets.samples import Samples
from fdpg_scale.targets.tasks import build_task
from fdpg_scale.training.config import TargetConfig
from tests.helpers import assert_close

# Lengths differ so that a batch pads; the last text is long enough to be truncated at max_length=8.
TEXTS = ["def f(x):\n    return x\n", "The quick brown fox", "a", "import os, sys", "}" * 3,
         "class Counter:\n    def add(self, amount=1):\n        self.value += amount\n"]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    return build_tiny_classifier_dir(tmp_path_factory.mktemp("clf") / "tiny-classifier", seed=3)


def samples(texts=TEXTS) -> Samples:
    n = len(texts)
    return Samples(token_ids=torch.zeros(n, 2, dtype=torch.long), mask=torch.ones(n, 2, dtype=torch.bool),
                   texts=list(texts))


def plain_forward(path, texts, label: int, max_length: int | None = None) -> torch.Tensor:
    """What a user would write: one text at a time (no padding), softmax of the logits."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt", truncation=max_length is not None, max_length=max_length)["input_ids"]
            out.append(torch.softmax(model(input_ids=ids).logits[0], -1)[label])
    return torch.stack(out)


def hf(path, kind="feature", **args) -> TargetConfig:
    return TargetConfig(kind="distributional" if kind == "feature" else kind, scorer="hf-classifier",
                        scorer_args={"path": str(path), **args}, moment=0.5 if kind == "feature" else None)


@pytest.mark.parametrize("batch_size, max_length", [(2, None), (4, 8), (64, None)])
def test_scores_equal_a_plain_transformers_forward(classifier_dir, batch_size, max_length):
    task = build_task(hf(classifier_dir, label="positive", batch_size=batch_size, max_length=max_length))
    expected = plain_forward(classifier_dir, TEXTS, label=1, max_length=max_length)
    assert_close(task.feature(samples()), expected, rtol=1e-5, atol=1e-6, name="classifier scores")
    assert float(expected.std()) > 1e-4, "random weights should give different scores to different texts"


def test_label_by_name_or_index_threshold_and_reward(classifier_dir):
    by_name = build_task(hf(classifier_dir, label="negative")).feature(samples())
    by_index = build_task(hf(classifier_dir, label=0)).feature(samples())
    positive = build_task(hf(classifier_dir, label=1)).feature(samples())
    assert torch.equal(by_name, by_index)
    assert_close(by_name + positive, torch.ones(len(TEXTS)), name="p(negative) + p(positive)")
    threshold = float(positive.median())
    task = build_task(hf(classifier_dir, kind="pointwise", label=1, threshold=threshold))
    assert task.feature(samples()).tolist() == (positive > threshold).float().tolist()
    assert task.target.log_scores(samples()).tolist() == [0.0 if p > threshold else -float("inf") for p in positive]
    reward = build_task(TargetConfig(kind="reward", beta=0.25, scorer="hf-classifier",
                                     scorer_args={"path": str(classifier_dir), "label": 1}))
    assert_close(reward.target.log_scores(samples()), positive / 0.25, name="r/β")


def test_loaded_once_frozen_in_eval_mode_and_one_forward_per_batch(classifier_dir):
    task = build_task(hf(classifier_dir, label=1, batch_size=4))
    scorer = task.columns[0].values.fn
    model = scorer.model
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    batch = samples()
    first = task.target.log_scores(batch)
    task.features(batch)
    assert len(calls) == 2                                   # 6 texts in batches of 4, for both uses
    assert torch.equal(task.target.log_scores(samples()), first)   # deterministic (eval mode: no dropout)
    assert scorer.model is model                             # never reloaded


def test_an_empty_text_is_scored(classifier_dir):
    task = build_task(hf(classifier_dir, label=1))
    values = task.feature(samples(["", "a"]))
    assert torch.isfinite(values).all()


def test_bad_arguments_and_directories_name_the_path(classifier_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [
        ({"path": str(tmp_path / "missing"), "label": 1}, rf"'{tmp_path / 'missing'}': no such directory"),
        ({"path": str(tmp_path / "empty"), "label": 1},
         rf"'{tmp_path / 'empty'}': cannot load a sequence classifier and its tokenizer from it \("),
        ({"path": str(classifier_dir), "label": "toxic"},
         r"label 'toxic' is not one of its labels \['negative', 'positive'\]"),
        ({"path": str(classifier_dir), "label": 2}, r"label index 2 is out of range for its 2 labels"),
        ({"path": str(classifier_dir)}, r"scorer_args \['label'\] are required"),
        ({"path": str(classifier_dir), "label": 1, "temperature": 2},
         r"unknown scorer_args \['temperature'\] \(valid: path, label, threshold, batch_size, max_length, dtype\)"),
        ({"path": str(classifier_dir), "label": 1, "dtype": "fp8"}, r"dtype must be one of fp32, bf16, fp16"),
    ]
    for args, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as err:
            build_task(TargetConfig(kind="reward", scorer="hf-classifier", scorer_args=args))
        assert "\n" not in str(err.value), str(err.value)
    with pytest.raises(ConfigError, match="hf-classifier as a pointwise constraint needs a threshold"):
        build_task(TargetConfig(kind="pointwise", scorer="hf-classifier",
                                scorer_args={"path": str(classifier_dir), "label": 1}))
