"""Alignment tasks named in configs: a target P(x) = a(x) · Π b_i(x) · exp(Σ r_j(x)/β_j + Σ λ_k φ_k(x)) and the
quantities whose means under π report alignment, one per scorer.

A scorer is a function of a batch of decoded samples giving one number per sample. A config names it as

- a built-in of ``SCORERS`` (``contains``, ``count``, ``parses_as_python``);
- ``hf-classifier``: a Hugging Face sequence classifier of the completion (``fdpg_scale.targets.hf_classifier``);
- ``hf-reward-model``: a Hugging Face reward model of prompt + completion (``fdpg_scale.targets.hf_reward_model``);
- ``package.module:function``: your own function of the texts (``fdpg_scale.targets.user_scorers``);

with its keyword arguments in ``scorer_args``. Its *kind* says how it enters the target:

- ``pointwise``: a constraint b(x) = [score(x) > 0]: P ∝ a·b; alignment = E_π[b];
- ``reward``: a reward r(x): P ∝ a·exp(r/β); alignment = E_π[r];
- ``feature`` (``target.kind: distributional`` in the one-scorer form): a feature φ(x): P ∝ a·exp(λφ), with
  the λ of all features fitted jointly so that E_p[φ_k] = moment_k (``fdpg_scale.training.target_fitting``);
  alignment = E_π[φ].

One scorer: ``target.kind`` / ``target.scorer`` / ``target.scorer_args`` (and ``moment`` / ``beta``); its
alignment column is ``alignment``. Several: a list ``target.scorers``, one column ``alignment/<name>`` each.
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from fdpg_scale.errors import ConfigError
from fdpg_scale.targets.samples import Samples
from fdpg_scale.targets.energy import BooleanScorer, EnergyTarget, ExponentialScorer, RewardScorer
from fdpg_scale.targets.user_scorers import FunctionScorer, checked_values

if TYPE_CHECKING:  # annotation only: targets sit below training and never import it at run time
    from fdpg_scale.training.config import TargetConfig

__all__ = ["Task", "Column", "build_task", "SCORERS"]


def contains(samples: Samples, *, substring: str) -> torch.Tensor:
    """[B] 1.0 where the decoded sample contains ``substring``."""
    return torch.tensor([substring in t for t in samples.texts], dtype=torch.float32)


def count(samples: Samples, *, substring: str) -> torch.Tensor:
    """[B] number of (non-overlapping) occurrences of ``substring`` in the decoded sample."""
    return torch.tensor([float(t.count(substring)) for t in samples.texts], dtype=torch.float32)


def parses_as_python(samples: Samples) -> torch.Tensor:
    """[B] 1.0 where the decoded sample is non-blank and parses as a Python module (``ast.parse``)."""
    return torch.tensor([_parses(t) for t in samples.texts], dtype=torch.float32)


def _parses(text: str) -> bool:
    if not text.strip():
        return False
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):  # ValueError: null bytes
        return False
    return True


SCORERS: dict[str, Callable[..., torch.Tensor]] = {"contains": contains, "count": count,
                                                   "parses_as_python": parses_as_python}

HF_CLASSIFIER = "hf-classifier"
HF_REWARD_MODEL = "hf-reward-model"
KINDS = ("pointwise", "reward", "feature")


class _LastBatch:
    """A scorer's values, computed once per batch: the target's log-scores and the alignment features read the
    same values (one classifier forward per batch, not two). Samples are immutable, so identity is enough."""

    def __init__(self, fn: Callable[[Samples], torch.Tensor]):
        self.fn = fn
        self._last: tuple[Samples, torch.Tensor] | None = None

    def __call__(self, samples: Samples) -> torch.Tensor:
        if self._last is None or self._last[0] is not samples:
            self._last = (samples, self.fn(samples))
        return self._last[1]


@dataclass(frozen=True, eq=False)
class Column:
    """One scorer of a task: its name (its metrics column), its kind and its values."""

    name: str
    kind: str
    """``pointwise``, ``reward`` or ``feature``."""
    values: Callable[[Samples], torch.Tensor]
    """Samples -> float32 [B]: the scorer's number for each sample."""
    beta: float = 1.0
    """reward: β of exp(r/β)."""
    moment: float | None = None
    """feature: the target E_p[φ]."""

    def alignment(self, samples: Samples) -> torch.Tensor:
        """float32 [B]: what E_π of reports this scorer's alignment: b(x) ∈ {0, 1}, r(x) or φ(x)."""
        v = self.values(samples)
        return (v > 0).to(torch.float32) if self.kind == "pointwise" else v


@dataclass(frozen=True)
class Task:
    """A target and, per scorer, the quantity whose mean under π reports alignment."""

    target: EnergyTarget
    columns: tuple[Column, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """The scorers' names, in config order."""
        return tuple(c.name for c in self.columns)

    def features(self, samples: Samples) -> dict[str, torch.Tensor]:
        """name -> float32 [B] for every scorer (``Column.alignment``)."""
        return {c.name: c.alignment(samples) for c in self.columns}

    def feature(self, samples: Samples) -> torch.Tensor:
        """float32 [B]: the one scorer's alignment quantity (a task of one scorer only)."""
        if len(self.columns) != 1:
            raise ValueError(f"Task.feature: this task has {len(self.columns)} scorers {list(self.names)}; "
                             f"use Task.features")
        return self.columns[0].alignment(samples)

    @property
    def feature_columns(self) -> tuple[Column, ...]:
        """The ``feature`` scorers, in the order of λ."""
        return tuple(c for c in self.columns if c.kind == "feature")

    @property
    def moments(self) -> tuple[float, ...]:
        """The target E_p[φ_k] of each feature, in the order of λ (empty: nothing to fit)."""
        return tuple(c.moment for c in self.feature_columns)

    @property
    def moment(self) -> float | list[float] | None:
        """None when there is no λ to fit; else the target moment (a float for one feature, a list for several)."""
        m = self.moments
        return None if not m else m[0] if len(m) == 1 else list(m)

    @property
    def exponential(self) -> ExponentialScorer | None:
        """The factor exp(λ·φ) of the features (None without features)."""
        found = [s for s in self.target.scorers if isinstance(s, ExponentialScorer)]
        return found[0] if found else None

    def with_lambdas(self, lambdas) -> "Task":
        """The same task with λ set (λ: one float per feature)."""
        new = self.exponential.with_lambdas(lambdas)
        scorers = [new if isinstance(s, ExponentialScorer) else s for s in self.target.scorers]
        return Task(target=EnergyTarget(scorers), columns=self.columns)


@dataclass(frozen=True)
class _Entry:
    scorer: str
    kind: str
    scorer_args: dict[str, Any]
    name: str | None
    beta: float
    moment: float | None
    where: str
    """The config key of this scorer, for errors."""


def _entries(cfg: TargetConfig) -> list[_Entry]:
    if cfg.scorers:
        return [_Entry(e.scorer, e.kind, dict(e.scorer_args), e.name, e.beta, e.moment, f"target.scorers[{i}]")
                for i, e in enumerate(cfg.scorers)]
    kind = "feature" if cfg.kind == "distributional" else cfg.kind
    return [_Entry(cfg.scorer, kind, dict(cfg.scorer_args), None, cfg.beta, cfg.moment, "target")]


def _default_name(spec: str) -> str:
    return spec.split(":")[-1]


def _values(e: _Entry, *, conditional: bool, device, dtype: str, metadata_columns: tuple[str, ...]
            ) -> Callable[[Samples], torch.Tensor]:
    """The entry's scorer as Samples -> float32 [B] (imports / loads it; one-line ConfigError if it cannot)."""
    if e.scorer in SCORERS:
        fn = SCORERS[e.scorer]
        wanted = {name for name, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}
        if set(e.scorer_args) != wanted:
            raise ConfigError(f"{e.where}.scorer_args for {e.scorer!r} must be exactly {sorted(wanted)}, got "
                              f"{sorted(e.scorer_args)}")
        args = e.scorer_args
        return lambda samples: checked_values(fn(samples, **args), samples, repr(e.scorer))
    if e.scorer == HF_CLASSIFIER:
        if e.kind == "pointwise" and e.scorer_args.get("threshold") is None:
            raise ConfigError(f"{e.where}.scorer_args: hf-classifier as a pointwise constraint needs a threshold "
                              f"(b(x) = [score > threshold]; a probability alone is always > 0)")
        from fdpg_scale.targets.hf_classifier import build_hf_classifier  # imports transformers

        return build_hf_classifier({"dtype": dtype, **e.scorer_args}, where=f"{e.where}.scorer", device=device)
    if e.scorer == HF_REWARD_MODEL:
        from fdpg_scale.targets.hf_reward_model import build_hf_reward_model  # imports transformers

        return build_hf_reward_model({"dtype": dtype, **e.scorer_args}, where=f"{e.where}.scorer", device=device)
    if ":" in e.scorer:
        return FunctionScorer.from_spec(e.scorer, e.scorer_args, where=f"{e.where}.scorer", conditional=conditional,
                                        metadata_columns=metadata_columns)
    raise ConfigError(f"{e.where}.scorer {e.scorer!r} is unknown; valid: a built-in ({', '.join(SCORERS)}), "
                      f"{HF_CLASSIFIER!r}, {HF_REWARD_MODEL!r} or 'package.module:function'")


def build_task(cfg: TargetConfig, tokenizer=None, *, device: str | torch.device = "cpu", dtype: str = "fp32",
               metadata_columns: tuple[str, ...] = ()) -> Task:
    """The task described by the ``target`` section of a run config.

    device: where model-based scorers (``hf-classifier``, ``hf-reward-model``) run: the rank's device. dtype: their
    parameter dtype unless their ``scorer_args.dtype`` says otherwise: the run's ``model.dtype``. metadata_columns: the prompt
    dataset's columns that ``package.module:function`` scorers receive as keyword arguments (the keys of
    ``PromptSet.metadata``). Every scorer is imported or loaded here, once; a wrong path, a missing function,
    bad arguments or a column a function does not take is a one-line ConfigError.
    """
    entries = _entries(cfg)
    names = [e.name or _default_name(e.scorer) for e in entries]
    for e, name in zip(entries, names):
        if e.kind not in KINDS:
            raise ConfigError(f"{e.where}.kind must be one of {', '.join(KINDS)}; got {e.kind!r}")
        if names.count(name) > 1:
            raise ConfigError(f"target.scorers: two scorers are named {name!r}; give each a distinct 'name'")
    conditional = cfg.prompts is not None or cfg.prompts_file is not None
    columns = tuple(Column(name=name, kind=e.kind, values=_LastBatch(_values(e, conditional=conditional,
                                                                              device=device, dtype=dtype,
                                                                              metadata_columns=metadata_columns)),
                           beta=e.beta, moment=e.moment) for e, name in zip(entries, names))
    scorers: list = []
    for c in columns:
        if c.kind == "pointwise":
            scorers.append(BooleanScorer(lambda s, c=c: c.values(s) > 0, name=c.name))
        elif c.kind == "reward":
            scorers.append(RewardScorer(c.values, beta=c.beta, name=c.name))
    features = {c.name: c.values for c in columns if c.kind == "feature"}
    if features:  # λ = 0 until fitted
        scorers.append(ExponentialScorer(features, name="λ·φ"))
    return Task(target=EnergyTarget(scorers), columns=columns)
