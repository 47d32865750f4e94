"""Shared test helpers: verbose allclose and tolerances by dtype; the miniature reproduce grid; enumerable
problems with exact log-probabilities (for the importance-sampled metrics and the λ fit)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from fdpg_scale.experiments.grid import Grid
from fdpg_scale.models.base_config import PretrainConfig
from fdpg_scale.models.corpus import stdlib_dir
from fdpg_scale.targets.samples import Samples

# (rtol, atol) for comparing a result computed from inputs of this dtype against a float64 reference.
# bf16 is loose on purpose: the Triton interpreter truncates fp32→bf16 instead of rounding (triton 3.7.1).
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float | None = None,
                 atol: float | None = None, dtype: torch.dtype | None = None, name: str = "tensor") -> None:
    """assert |actual − expected| ≤ atol + rtol·|expected| elementwise, reporting the worst element."""
    if rtol is None or atol is None:
        d_rtol, d_atol = TOLERANCES[dtype or actual.dtype]
        rtol = d_rtol if rtol is None else rtol
        atol = d_atol if atol is None else atol
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    same_nonfinite = (a == e) | (torch.isnan(a) & torch.isnan(e))
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = ~same_nonfinite & ~(err <= bound)
    if bad.any():
        idx = int(torch.nonzero(bad.flatten())[0]) if bad.any() else 0
        worst = int(torch.argmax(torch.where(bad, err, torch.zeros_like(err)).flatten()))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements off (rtol={rtol:g}, atol={atol:g}); "
            f"first at flat index {idx}: {a.flatten()[idx].item()!r} vs {e.flatten()[idx].item()!r}; "
            f"worst at {worst}: {a.flatten()[worst].item()!r} vs {e.flatten()[worst].item()!r} "
            f"(max abs err {err[~same_nonfinite].max().item():.3e})")


# ------------------------------------------------------------------------------ the miniature reproduce grid
# A base that pretrains in seconds on a few stdlib files (as tests/apps/test_pretrain.py's), and runs of 2 steps of 8
# sequences: the quick mode's code path at a fraction of its cost.
TINY_BASE = PretrainConfig(steps=20, batch_size=8, block_size=64, vocab_size=512, n_layer=2, n_embd=32, n_head=4,
                           lr=5e-3, warmup_steps=2, eval_blocks=16)
TINY_CORPUS_FILES = ("argparse.py", "textwrap.py", "shlex.py", "glob.py", "fnmatch.py", "bisect.py", "heapq.py",
                     "queue.py")
TINY_RUN_OVERRIDES = ("train.global_batch=8", "train.micro_batch=4", "train.proposal_min_samples=8",
                      "sampling.max_new_tokens=8", "target.scorer_args.substring=e")


def tiny_grid(tmp_path: Path, *, seeds: tuple[int, ...] = (0, 1)) -> Grid:
    """The miniature grid: TINY_BASE pretrained on TINY_CORPUS_FILES (copied to ``tmp_path/corpus``, the base
    cached in ``tmp_path/models``), one cell (pointwise common), kl and js, 2 steps evaluated at 2
    checkpoints on 16 samples: 2 runs per seed."""
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for name in TINY_CORPUS_FILES:
        shutil.copy(stdlib_dir() / name, corpus / name)
    return Grid(name="test", sizes={"tiny": TINY_BASE},
                cells=((Path("configs/reproduce/pointwise-common.yaml"), "tiny"),), divergences=("kl", "js"),
                seeds=seeds, steps=2, eval_points=2, eval_samples=16, overrides=TINY_RUN_OVERRIDES,
                base_root=tmp_path / "models", corpus=corpus, prompts=4)


def grid_yaml(grid: Grid) -> str:
    """``grid`` as a ``--grid`` file: every field of the Grid, a size as its PretrainConfig fields that differ
    from the defaults (what a user writes)."""
    def plain(value):
        if isinstance(value, PretrainConfig):
            default = PretrainConfig()
            return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)
                    if getattr(value, f.name) != getattr(default, f.name)}
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    return yaml.safe_dump({f.name: plain(getattr(grid, f.name)) for f in dataclasses.fields(grid)}, sort_keys=False)

# ------------------------------------------------------------------------------ enumerable test problems
# Every sequence listed once, with log π, log q, log a, log P and features: a finite support of M items (the
# sequences of a toy LM, or plain categories) with exact per-item log-probabilities; sampling from q draws item
# indices, and the importance-sampled metrics then see exactly the per-sequence vectors the trainer would give them.

@dataclass
class Enumerated:
    """Per-item float64 vectors [M] over the whole support."""

    logp_pi: torch.Tensor
    logp_q: torch.Tensor
    logp_a: torch.Tensor
    log_target: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    sampler: Callable[[int, torch.Generator], torch.Tensor] | None = None
    """(n, generator) -> LongTensor [n] item indices drawn from q; None: categorical draws from exp(logp_q)."""

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """LongTensor [n]: item indices drawn i.i.d. from q."""
        if self.sampler is not None:
            return self.sampler(n, generator)
        return torch.multinomial(torch.softmax(self.logp_q, 0), n, replacement=True, generator=generator)

    def batch(self, idx: torch.Tensor) -> dict:
        """The keyword arguments of ``importance_sampled_metrics`` for the sampled items ``idx``."""
        return dict(logp_pi=self.logp_pi[idx], logp_q=self.logp_q[idx], logp_a=self.logp_a[idx],
                    log_target=self.log_target[idx], features={k: v[idx] for k, v in self.features.items()})

    def exact_kwargs(self) -> dict:
        """The keyword arguments of ``exact_metrics``."""
        return dict(logp_pi=self.logp_pi, logp_a=self.logp_a, log_target=self.log_target, features=self.features,
                    logp_q=self.logp_q)


def categorical_problem(m: int, *, seed: int, kind: str, q_is_pi: bool) -> Enumerated:
    """Random categorical π, q, a over m items and a target P = a·exp(λ·φ) ("exponential") or a·b with
    b ∈ {0, 1} on about 70 % of the items ("boolean"); q = π when ``q_is_pi``."""
    g = torch.Generator().manual_seed(seed)

    def random_logprobs(scale):
        return torch.log_softmax(scale * torch.randn(m, generator=g, dtype=torch.float64), 0)

    logp_a = random_logprobs(1.0)
    logp_pi = torch.log_softmax(logp_a + 0.7 * torch.randn(m, generator=g, dtype=torch.float64), 0)
    logp_q = logp_pi.clone() if q_is_pi else torch.log_softmax(logp_a + 0.7 * torch.randn(m, generator=g,
                                                                                          dtype=torch.float64), 0)
    phi = torch.rand(m, 2, generator=g, dtype=torch.float64)
    if kind == "exponential":
        log_target = logp_a + phi @ torch.tensor([1.5, -1.0], dtype=torch.float64)
    elif kind == "boolean":
        b = torch.rand(m, generator=g, dtype=torch.float64) < 0.7
        log_target = torch.where(b, logp_a, torch.tensor(float("-inf"), dtype=torch.float64))
    else:
        raise ValueError(kind)
    return Enumerated(logp_pi=logp_pi, logp_q=logp_q, logp_a=logp_a, log_target=log_target,
                      features={"phi0": phi[:, 0], "phi1": phi[:, 1]})


# ------------------------------------------------------------------------------------ the toy LM problem

def toy_features(eos: int, max_len: int) -> dict:
    """Two features of a toy sequence in [0, 1]: the share of the L slots holding token 0, and length/L."""
    return {"zeros": lambda s: ((s.token_ids == 0) & s.mask).sum(-1).double() / max_len,
            "length": lambda s: ((s.token_ids != eos) & s.mask).sum(-1).double() / max_len}


def toy_samples(model, seqs: torch.Tensor) -> Samples:
    """The toy's EOS-padded rows [n, L] as ``Samples`` (mask: the decisions, EOS included)."""
    return Samples(token_ids=seqs, mask=model.mask(seqs))


def toy_problem(*, seed: int, kind: str, q_is_pi: bool, vocab_size: int = 3, max_len: int = 4,
                init_scale: float = 0.5):
    """Base a, policy π and proposal q as three ``ToyLM``s; target P = a·exp(λ·φ) (kind "exponential", the
    two ``toy_features``) or a·b with b = "contains token 0" ("boolean"), built as an ``EnergyTarget`` and
    evaluated on every sequence. init_scale 0.5 (vs the toy's default 1.0) keeps the weights p/q light-tailed
    enough for the asymptotic standard errors at N = 20 000: measured over 100 seeds at init_scale 1.0, the
    spread of the ESS fraction (whose standard error rests on E_q[(p/q)⁴]) was 1.7–2.3× its reported standard
    error and the other metrics' up to 1.2×; at 0.5 every ratio was 0.88–1.10. ``sample`` draws sequences
    with ``q.sample`` (token by token) and maps them to their rows of the enumeration with ``sequence_index``."""
    from fdpg_scale.targets.energy import BooleanScorer, EnergyTarget, ExponentialScorer
    from fdpg_scale.toy.model import ToyLM

    g = torch.Generator().manual_seed(seed)
    a, pi, q = (ToyLM(vocab_size, max_len, init_scale=init_scale, generator=g) for _ in range(3))
    q = pi if q_is_pi else q
    feats = toy_features(a.eos, max_len)
    if kind == "exponential":
        target = EnergyTarget([ExponentialScorer(feats, [1.5, -1.0])])
    elif kind == "boolean":
        target = EnergyTarget([BooleanScorer(lambda s: feats["zeros"](s) > 0, name="has_zero")])
    else:
        raise ValueError(kind)
    with torch.no_grad():
        seqs = a.all_sequences()
        samples = toy_samples(a, seqs)
        logp_a = a.log_prob(seqs)
        prob = Enumerated(logp_pi=pi.log_prob(seqs), logp_q=q.log_prob(seqs), logp_a=logp_a,
                          log_target=target.log_target(logp_a, samples),
                          features={name: fn(samples) for name, fn in feats.items()},
                          sampler=lambda n, gen: q.sequence_index(q.sample(n, gen)))
    return prob


def vllm_tiny_gpt2(path):
    """The tiny GPT-2 with 2 heads of 32 instead of 4 of 16 (same weights: GPT-2's shapes do not depend on the
    head count): vLLM's CPU attention has no kernel for head size 16."""
    from fdpg_scale.models.tiny import build_tiny_model_dir

    build_tiny_model_dir(path, "gpt2")
    config = json.loads((path / "config.json").read_text())
    config["n_head"] = 2
    (path / "config.json").write_text(json.dumps(config))
    return path
