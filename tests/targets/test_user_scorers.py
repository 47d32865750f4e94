"""Your own scorer, ``target.scorer: package.module:function``: found, called, checked; every bad case is one line."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from fdpg_scale.errors import ConfigError, ScorerError
from fdpg_scale.targets.samples import Samples
from fdpg_scale.targets.tasks import build_task
from fdpg_scale.training.config import TargetConfig

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ['def f():\n    """Doc."""\n', "x = 1", "", "'''", "eee"]

BAD_SCORERS = '''
import math

def wrong_length(texts):
    return [1.0] * (len(texts) + 1)

def a_scalar(texts):
    return 3.0

def two_columns(texts):
    return [[1.0, 2.0] for _ in texts]

def with_nan(texts):
    return [math.nan if t == "x = 1" else 0.0 for t in texts]

def with_none(texts):
    return [None for _ in texts]

def with_inf(texts):
    return [math.inf for _ in texts]

def words(texts):
    return ["yes" for _ in texts]

def needs_contexts(texts, contexts):
    return [float(c in t) for t, c in zip(texts, contexts)]

def no_texts(*, scale):
    return []

NOT_A_FUNCTION = 3
'''


def samples(texts=TEXTS, contexts=None) -> Samples:
    n = len(texts)
    return Samples(token_ids=torch.zeros(n, 2, dtype=torch.long), mask=torch.ones(n, 2, dtype=torch.bool),
                   texts=list(texts), contexts=contexts)


@pytest.fixture
def bad_module(tmp_path, monkeypatch):
    """A module ``my_bad_scorers`` on PYTHONPATH (sys.path), as a user's own module would be."""
    (tmp_path / "my_bad_scorers.py").write_text(BAD_SCORERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_bad_scorers"
    sys.modules.pop("my_bad_scorers", None)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_examples_has_docstring_from_the_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    task = build_task(TargetConfig(kind="pointwise", scorer="examples.my_scorers:has_docstring"))
    assert task.names == ("has_docstring",)
    assert task.feature(samples()).tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert task.target.log_scores(samples()).tolist() == [0.0, -math.inf, -math.inf, 0.0, -math.inf]


def test_scorer_args_are_passed_and_checked_against_the_signature(monkeypatch):
    monkeypatch.chdir(ROOT)
    task = build_task(TargetConfig(kind="reward", scorer="examples.my_scorers:length_between",
                                   scorer_args={"low": 1, "high": 5}, beta=0.5))
    assert task.feature(samples()).tolist() == [0.0, 1.0, 0.0, 1.0, 1.0]
    assert task.target.log_scores(samples()).tolist() == [0.0, 2.0, 0.0, 2.0, 2.0]   # r/β
    with pytest.raises(ConfigError, match=r"target.scorer 'examples.my_scorers:length_between': scorer_args "
                                          r"\['low'\] do not fit .*missing a required argument: 'high'") as err:
        build_task(TargetConfig(scorer="examples.my_scorers:length_between", scorer_args={"low": 1}))
    one_line(err)
    with pytest.raises(ConfigError, match="unexpected keyword argument 'substring'") as err:
        build_task(TargetConfig(scorer="examples.my_scorers:has_docstring", scorer_args={"substring": "x"}))
    one_line(err)


def test_the_working_directory_is_searched_during_the_import_only(tmp_path, monkeypatch):
    (tmp_path / "cwd_scorers.py").write_text("def longer_than_two(texts):\n    return [len(t) > 2 for t in texts]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    try:
        task = build_task(TargetConfig(scorer="cwd_scorers:longer_than_two"))
        assert task.feature(samples()).tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]   # bools count as 0/1
        assert sys.path == before
    finally:
        sys.modules.pop("cwd_scorers", None)


def test_wrong_path_missing_function_and_unknown_names_are_one_line_errors(bad_module):
    cases = [
        ("no_such_package.scorers:f", r"target.scorer 'no_such_package.scorers:f': cannot import module "
                                      r"'no_such_package.scorers' \(ModuleNotFoundError: No module named "
                                      r"'no_such_package'\)"),
        (f"{bad_module}:missing", rf"target.scorer '{bad_module}:missing': module '{bad_module}' \(.*\) has no "
                                  r"attribute 'missing'"),
        (f"{bad_module}:NOT_A_FUNCTION", r"my_bad_scorers.NOT_A_FUNCTION is a int, not a function"),
        (f"{bad_module}:no_texts", r"must take the list of texts as its first positional parameter"),
        ("my scorers:f", r"target.scorer 'my scorers:f' is not of the form 'package.module:function'"),
        ("nope", r"target.scorer 'nope' is unknown; valid: a built-in \(contains, count, parses_as_python\), "
                 r"'hf-classifier', 'hf-reward-model' or 'package.module:function'"),
        (f"{bad_module}:needs_contexts", r"needs contexts, but the target is unconditional"),
    ]
    for spec, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as err:
            build_task(TargetConfig(scorer=spec))
        one_line(err)


@pytest.mark.parametrize("name, pattern", [
    ("wrong_length", r"returned shape \(6,\); expected one float per sample: \(5,\)"),
    ("a_scalar", r"returned shape \(\); expected one float per sample: \(5,\)"),
    ("two_columns", r"returned shape \(5, 2\)"),
    ("with_nan", r"returned nan for sample 1 \(text 'x = 1'\): scores must be finite numbers"),
    ("with_none", r"returned nan for sample 0 .*\(None, NaN and inf are not\)"),
    ("with_inf", r"returned inf for sample 0"),
    ("words", r"returned list \['yes', .*not numbers"),
])
def test_bad_return_values_name_the_scorer_and_the_problem(bad_module, name, pattern):
    task = build_task(TargetConfig(kind="reward", scorer=f"{bad_module}:{name}"))
    with pytest.raises(ScorerError, match=rf"^scorer '{bad_module}:{name}' {pattern}") as err:
        task.target.log_scores(samples())
    one_line(err)


def test_contexts_reach_a_function_that_asks_for_them(bad_module):
    cfg = TargetConfig(scorer=f"{bad_module}:needs_contexts", prompts_file="prompts.jsonl")
    task = build_task(cfg)
    batch = samples(texts=["abc", "abc"], contexts=["b", "z"])
    assert task.feature(batch).tolist() == [1.0, 0.0]


def test_the_scorer_runs_once_per_batch(bad_module, tmp_path):
    (tmp_path / "counting_scorer.py").write_text("CALLS = []\n\ndef f(texts):\n    CALLS.append(1)\n"
                                                  "    return [1.0] * len(texts)\n")
    try:
        task = build_task(TargetConfig(scorer="counting_scorer:f"))
        batch = samples()
        task.target.log_scores(batch)
        task.features(batch)
        import counting_scorer

        assert len(counting_scorer.CALLS) == 1    # the log-scores and the alignment share one call
        task.features(samples())
        assert len(counting_scorer.CALLS) == 2    # a new batch is scored again
    finally:
        sys.modules.pop("counting_scorer", None)

