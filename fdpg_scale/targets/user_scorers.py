"""Your own scorer: a Python function named ``package.module:function`` in a config, and the checks on what it returns.

The function receives the decoded texts of a batch (``list[str]``, one per sample) as its first positional
argument, the contexts (``list[str]``, the prompt each sample continues) as the keyword ``contexts`` if its
signature has a parameter of that name, every metadata column of the prompt dataset (``target.prompts``'s
columns but the prompt, or ``target.metadata_columns``) as a keyword argument holding one value per sample, and
``target.scorer_args`` as keyword arguments. It returns one number per sample: a list, a tuple, a numpy array
or a tensor of length B. For example::

    def has_docstring(texts):
        return [1.0 if '\"\"\"' in t else 0.0 for t in texts]

    def correct(texts, answer):          # prompts with an "answer" column
        return [float(a in t) for t, a in zip(texts, answer)]

A function must take every metadata column it is given (a parameter of that name, or ``**kwargs``): a column
it would never see is one ConfigError before the run starts, naming the column.

Finding the module: it is imported with ``importlib.import_module`` (never ``eval`` of config text) from
``sys.path``, i.e. the installed packages and the ``PYTHONPATH`` directories, with the working directory
searched first, as ``python -m`` does. So ``examples.my_scorers:has_docstring`` resolves from the repository
root whether the trainer was started as ``fdpg-scale train`` or ``python -m fdpg_scale.cli train``. The
working directory is on the search path only while the module is imported, so it never shadows later imports.
Every rank imports the module itself: it must be importable on every node.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fdpg_scale.errors import ConfigError, NonFiniteScoreError, ScorerError
from fdpg_scale.targets.samples import Samples

__all__ = ["import_function", "FunctionScorer", "checked_values", "is_function_spec"]

_SPEC_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


def is_function_spec(spec: str) -> bool:
    """Whether ``spec`` has the form ``package.module:function``."""
    return bool(_SPEC_RE.match(spec))


def import_function(spec: str, where: str) -> Callable:
    """The callable named ``package.module:function`` (see the module docstring for where it is looked up).

    where: the config key, for the one-line ConfigError on a wrong path, a missing module or function.
    """
    if not is_function_spec(spec):
        raise ConfigError(f"{where} {spec!r} is not of the form 'package.module:function'")
    module_name, attr = spec.split(":")
    try:
        module = _import_with_working_directory(module_name)
    except ImportError as err:
        raise ConfigError(f"{where} {spec!r}: cannot import module {module_name!r} ({type(err).__name__}: {err}); "
                          f"it must be importable from the working directory {os.getcwd()!r}, PYTHONPATH or an "
                          f"installed package") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"{where} {spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                          f"attribute {attr!r}")
    if not callable(fn):
        raise ConfigError(f"{where} {spec!r}: {module_name}.{attr} is a {type(fn).__name__}, not a function")
    return fn


def _import_with_working_directory(module_name: str):
    # ``python -m`` puts the working directory first on sys.path and a console script does not; searching it
    # first, during this import only, makes both launchers find the same module.
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    finally:
        if added:
            sys.path.remove(cwd)


def checked_values(out, samples: Samples, label: str) -> torch.Tensor:
    """A scorer's output as float32 [B], or a one-line ScorerError naming ``label``, the sample and the problem.

    Accepted: a list/tuple/numpy array/tensor of B numbers (bools count as 0/1); every value finite.
    """
    b = samples.batch_size
    if isinstance(out, torch.Tensor):
        t = out.detach().cpu()
        if t.dtype.is_complex:
            raise ScorerError(f"scorer {label} returned a tensor of dtype {t.dtype}; expected {b} real numbers")
        t = t.to(torch.float64)
    else:
        try:
            t = torch.from_numpy(np.asarray(out, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise ScorerError(f"scorer {label} returned {_short(out)}, not numbers ({err}); expected one float per "
                              f"sample ({b})") from None
    if t.shape != (b,):
        raise ScorerError(f"scorer {label} returned shape {tuple(t.shape)}; expected one float per sample: ({b},)")
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        i = int(torch.nonzero(bad).flatten()[0])
        text = "" if samples.texts is None else f" (text {samples.texts[i][:60]!r})"
        raise NonFiniteScoreError(f"scorer {label} returned {t[i].item()} for sample {i}{text}: scores must be finite "
                          f"numbers (None, NaN and inf are not)")
    return t.to(torch.float32)


def _short(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'…' if len(text) > 60 else ''}"


@dataclass(frozen=True, eq=False)
class FunctionScorer:
    """A user function of the decoded texts as ``Samples -> float32 [B]``, its arguments bound once.

    Build it with ``FunctionScorer.from_spec``; calling it checks every output (``checked_values``).
    """

    spec: str
    """``package.module:function``, as in the config."""
    fn: Callable
    kwargs: dict
    """``scorer_args``."""
    takes_contexts: bool
    columns: tuple[str, ...] = ()
    """The metadata columns passed as keyword arguments (``Samples.metadata``)."""

    @classmethod
    def from_spec(cls, spec: str, scorer_args: dict, *, where: str, conditional: bool,
                  metadata_columns: tuple[str, ...] = ()) -> FunctionScorer:
        """Import ``spec`` and check ``scorer_args`` and the metadata columns against its signature (one-line
        ConfigError naming ``where``).

        conditional: whether the target has contexts (``target.prompts`` or ``target.prompts_file``); a function
        whose ``contexts`` parameter has no default needs one. metadata_columns: the prompt dataset's columns
        the function receives as keyword arguments (module docstring).
        """
        fn = import_function(spec, where)
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} {spec!r}: cannot read the signature of {fn!r}") from None
        params = list(sig.parameters.values())
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD,
                                                params[0].VAR_POSITIONAL):
            raise ConfigError(f"{where} {spec!r}: {fn.__name__}{sig} must take the list of texts as its first "
                              f"positional parameter")
        if "contexts" in scorer_args:
            raise ConfigError(f"{where} {spec!r}: 'contexts' is given by the trainer (the prompts), not by "
                              f"scorer_args")
        takes_contexts = "contexts" in sig.parameters
        if takes_contexts and not conditional and sig.parameters["contexts"].default is inspect.Parameter.empty:
            raise ConfigError(f"{where} {spec!r}: {fn.__name__} needs contexts, but the target is unconditional "
                              f"(set target.prompts, or give contexts a default)")
        _check_columns(fn, sig, params[0].name, metadata_columns, scorer_args, where=f"{where} {spec!r}")
        try:
            sig.bind(None, **({"contexts": None} if takes_contexts else {}), **scorer_args,
                     **dict.fromkeys(metadata_columns))
        except TypeError as err:
            raise ConfigError(f"{where} {spec!r}: scorer_args {sorted(scorer_args)} do not fit "
                              f"{fn.__name__}{sig}: {err}") from None
        return cls(spec=spec, fn=fn, kwargs=dict(scorer_args), takes_contexts=takes_contexts,
                   columns=tuple(metadata_columns))

    def __call__(self, samples: Samples) -> torch.Tensor:
        """float32 [B]: the function on ``samples.texts`` (and ``samples.contexts``, the metadata columns), checked."""
        if samples.texts is None:
            raise ScorerError(f"scorer {self.spec!r} reads decoded texts, but these samples have none")
        extra = {"contexts": samples.contexts} if self.takes_contexts else {}
        if self.columns:
            metadata = samples.metadata or {}
            missing = [c for c in self.columns if c not in metadata]
            if missing:
                raise ScorerError(f"scorer {self.spec!r} takes the prompt column {missing[0]!r}, but these samples "
                                  f"carry no such metadata")
            extra.update({c: list(metadata[c]) for c in self.columns})
        return checked_values(self.fn(list(samples.texts), **extra, **self.kwargs), samples, repr(self.spec))


def _check_columns(fn: Callable, sig: inspect.Signature, first: str, columns: tuple[str, ...], scorer_args: dict, *,
                   where: str) -> None:
    """Every metadata column must reach ``fn`` as its own keyword argument (one-line ConfigError naming it)."""
    params = sig.parameters
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for column in columns:
        taken = {first: "the texts", "contexts": "the contexts"}.get(column)
        if taken is None and column in scorer_args:
            taken = "a scorer_args key"
        if taken is not None:
            raise ConfigError(f"{where}: the prompt column {column!r} has the name of {taken}; rename the column, or "
                              f"leave it out of target.metadata_columns")
        p = params.get(column)
        if p is not None and p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL):
            p = None
        if p is None and not var_keyword:
            raise ConfigError(f"{where}: {fn.__name__}{sig} does not take the prompt column {column!r} (every column "
                              f"but the prompt reaches a function scorer as a keyword argument): add a parameter "
                              f"{column!r} or **kwargs, or list the columns it takes in target.metadata_columns")
