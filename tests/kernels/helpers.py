"""Inputs and float64 oracles of the kernel tests, shared by the interpreter tests (tests/kernels/test_*.py)
and the compiled-kernel tests on a GPU (test_compiled_gpu.py), which feed the same cases to the compiled kernels.

- per-token log-probs: the naive float64 formulas (the logits materialised) and the test cases;
- fdiv_weights: dyadic batches (every masked sum exact in float32) in three layouts, the float64 f-DPG
  quantities written out plainly, and the textbook f′ in 60-digit arithmetic over |log t| ≤ 1e4.
"""

from __future__ import annotations

import math

import mpmath
import torch

from fdpg_scale.core.divergences import DIVERGENCE_NAMES, Divergence, get_divergence
from fdpg_scale.kernels import FDivWeights
from tests.helpers import assert_close

mpmath.mp.dps = 60

F64 = torch.float64
F32_MAX = float(torch.finfo(torch.float32).max)
F32_TINY = float(torch.finfo(torch.float32).tiny)
B, T = 37, 53
"""The fdiv batches' default size: an odd batch and a token count that leave partial blocks of 16."""
DIVERGENCES = ([get_divergence(n) for n in DIVERGENCE_NAMES if n != "alpha"]
               + [get_divergence("alpha", alpha=a) for a in (-0.5, 0.5, 2.0, 3.0)])
IDS = [str(d) for d in DIVERGENCES]
UNBOUNDED = {"rkl", "rchi2", "alpha(2)", "alpha(3)"}     # f′ → +∞ at t → ∞
OUTSIDE_R = -5.0
"""outside_support_reward passed everywhere: used by rkl, rchi2, alpha(2), alpha(3) for row 1 (log P = −inf)."""
FIELDS = ("weight", "pseudo_reward", "importance_ratio", "log_t")
IGNORE = -100


# ------------------------------------------------------------------------------------- per-token log-probs

def naive_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """float64 log softmax(logits/T)[t], 0 where t == -100 (materialises everything; tests only)."""
    lp = torch.log_softmax(logits.to(torch.float64) / temperature, dim=-1)
    picked = lp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(targets == IGNORE, torch.zeros_like(picked), picked)


def naive_linear_logprobs(hidden, weight, targets, bias=None, temperature: float = 1.0):
    """float64 log softmax((h·Wᵀ + b)/T)[t] (materialises [..., V]; tests only)."""
    logits = hidden.to(torch.float64) @ weight.to(torch.float64).T
    if bias is not None:
        logits = logits + bias.to(torch.float64)
    return naive_token_logprobs(logits, targets, temperature)


def make_linear_case(lead=(37,), hd=67, vocab=1031, *, dtype=torch.float32, bias=True, scale=1.0, seed=0,
                     masked_row=None):
    """Random inputs with logits of order `scale`·3, some targets masked (and optionally a whole row)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, hd, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hd, generator=gen, dtype=torch.float64) * (3.0 * scale / hd ** 0.5)
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) * scale if bias else None
    targets = torch.randint(0, vocab, lead, generator=gen)
    targets.view(-1)[::5] = IGNORE
    targets.view(-1)[1] = vocab - 1  # the last column, in the last (partial) block
    if masked_row is not None:
        targets[masked_row] = IGNORE
    grad = torch.randn(*lead, generator=gen, dtype=torch.float64)
    cast = [x.to(dtype).requires_grad_() if x is not None else None for x in (hidden, weight, b)]
    return (*cast, targets, grad)


def grads(out, inputs, grad):
    live = [x for x in inputs if x is not None]
    got = torch.autograd.grad(out, live, grad.to(out.dtype))
    return list(got)


def banned_token_case(seed: int = 7):
    """make_linear_case with −inf bias on banned tokens: the first 300 columns (whole vocab chunks at the
    start, where an online log-sum-exp still has max −inf) and every 7th; no target is banned."""
    hidden, weight, bias, targets, grad = make_linear_case(lead=(37,), hd=20, vocab=700, seed=seed)
    banned = torch.zeros(700, dtype=torch.bool)
    banned[:300] = True
    banned[::7] = True
    with torch.no_grad():
        bias[banned] = float("-inf")
    allowed = (~banned).nonzero().squeeze(1)
    targets = torch.where(targets == IGNORE, IGNORE, allowed[targets.clamp(min=0) % len(allowed)])
    return hidden, weight, bias, targets, grad


def make_token_case(lead, vocab, *, dtype=torch.float32, scale=4.0, seed=0):
    """Logits [*lead, vocab] (a leaf, fp64 draws scaled by ``scale``, cast to ``dtype``), targets [*lead] with
    every 4th ignored and one at the last id, and a random upstream gradient [*lead]."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*lead, vocab, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, lead, generator=gen)
    targets.view(-1)[::4] = IGNORE
    targets.view(-1)[1] = vocab - 1
    grad = torch.randn(*lead, generator=gen)
    return logits, targets, grad


# ----------------------------------------------------------------------------------------------- fdiv_weights

def make_batch(dtype=torch.float32, seed=0, batch=B, tokens=T):
    """Per-token dyadic log-probs [B, T] (exactly summable), mask, log_scores [B], log_z [B]."""
    g = torch.Generator().manual_seed(seed)
    step = 1 / 64 if dtype in (torch.float32, F64) else 1 / 8

    def dyadic(lo, hi, shape):
        return torch.randint(int(lo / step), int(hi / step) + 1, shape, generator=g).to(F64) * step

    pi = dyadic(-6, 0, (batch, tokens))
    q = (pi + dyadic(-1, 1, (batch, tokens))).clamp(max=0)
    a = dyadic(-6, 0, (batch, tokens))
    mask = torch.rand(batch, tokens, generator=g) < 0.7
    log_scores = dyadic(-3, 3, (batch,))
    log_z = dyadic(-2, 2, (batch,))
    if batch >= 6 and tokens >= 1:
        mask[0] = False                     # fully masked row: every sum is 0
        mask[1:6, 0] = True
        a[1, 0] = float("-inf")             # outside the target's support
        pi[2, 0], q[2, 0] = 0.0, -64.0      # log π − log q ≈ +64
        pi[3, 0], q[3, 0] = -64.0, 0.0      # log π − log q ≈ −64 (and log t ≈ −64)
        log_z[4] += 60.0                    # log t ≈ +60
        log_z[5] -= 60.0                    # log t ≈ −60
    # Padding may hold anything: a NaN or −inf outside the mask must never be read.
    pi = torch.where(mask, pi, torch.full_like(pi, float("nan")))
    a = torch.where(mask | (torch.arange(tokens) % 2 == 0), a, torch.full_like(a, float("-inf")))
    return dict(pi=pi.to(dtype), q=q.to(dtype), a=a.to(dtype), mask=mask, log_scores=log_scores.float(),
                log_z=log_z.float())


def layout(batch_data, name):
    """Arguments for fdiv_weights in one of three layouts (all describing the same sequences)."""
    mask = batch_data["mask"]

    def seq(x):  # exact: dyadic sums fit float32's mantissa
        return torch.where(mask, x.to(F64), 0.0).sum(-1).float()

    pi, q, a, scores = batch_data["pi"], batch_data["q"], batch_data["a"], batch_data["log_scores"]
    if name == "sequence":
        return dict(logp_pi=seq(pi), logp_q=seq(q), log_target=seq(a) + scores, log_scores=None, mask=None)
    if name == "token":
        return dict(logp_pi=pi, logp_q=q, log_target=a, log_scores=scores, mask=mask)
    assert name == "mixed"       # per-token π and target, per-sequence q
    return dict(logp_pi=pi, logp_q=seq(q), log_target=a, log_scores=scores, mask=mask)


def naive64(batch_data, d: Divergence, baseline=0.0, clip=None) -> dict[str, torch.Tensor]:
    """The f-DPG quantities in float64 from the same (rounded) inputs, written out plainly."""
    mask = batch_data["mask"]

    def s(x):
        return torch.where(mask, x.to(F64), 0.0).sum(-1)

    log_pi, log_q = s(batch_data["pi"]), s(batch_data["q"])
    log_p = s(batch_data["a"]) + batch_data["log_scores"].to(F64)
    outside = torch.isneginf(log_p)
    log_t = torch.where(outside, torch.inf, log_pi - (log_p - batch_data["log_z"].to(F64)))
    limit = d.fprime_spec.limit_at_infinity
    r = torch.where(outside, -limit if limit is not None else OUTSIDE_R, -d.f_prime(log_t))
    if clip is not None:
        r = r.clamp(-clip, clip)
    ratio = torch.exp(log_pi - log_q)
    base = baseline.to(F64) if isinstance(baseline, torch.Tensor) else torch.tensor(baseline, dtype=F64)
    return dict(weight=ratio * (base - r), pseudo_reward=r, importance_ratio=ratio, log_t=log_t,
                baseline=base.expand_as(r))


def assert_matches_naive(out: FDivWeights, ref: dict, what: str) -> None:
    """log t exact; f′ and exp to float32 evaluation error; weight also allows B − r's cancellation.

    Where the float64 value is beyond float32 the output must be the same-signed inf; NaN never.
    """
    for f in FIELDS:
        t = getattr(out, f)
        assert t.dtype == torch.float32 and t.shape == ref[f].shape and not t.requires_grad, (what, f)
        assert not torch.isnan(t).any(), f"{what}: NaN {f} at rows {torch.nonzero(torch.isnan(t)).flatten().tolist()}"
        beyond = ref[f].abs() > F32_MAX * (1 + 1e-5)
        assert torch.equal(t[beyond].to(F64), ref[f][beyond].sign() * torch.inf), (what, f, t[beyond])
    ref = {k: torch.where(v.abs() > F32_MAX * (1 + 1e-5), v.sign() * torch.inf, v) for k, v in ref.items()}
    assert_close(out.log_t, ref["log_t"], rtol=0, atol=0, name=f"{what} log_t")
    # rtol: exp of an fp32-rounded argument of size ≤ 80 (α·log t, −2·log t): ≤ 80·2^−24 ≈ 5e-6.
    assert_close(out.pseudo_reward, ref["pseudo_reward"], rtol=1e-5, atol=1e-6, name=f"{what} pseudo_reward")
    assert_close(out.importance_ratio, ref["importance_ratio"], rtol=1e-6, atol=0, name=f"{what} ratio")
    r, ratio = ref["pseudo_reward"].abs(), ref["importance_ratio"]
    tol = 2e-6 * ref["weight"].abs() + ratio * (1e-5 * r + 1e-6 * ref["baseline"].abs() + 1e-6)
    err = (out.weight.to(F64) - ref["weight"]).abs()
    bad = ~(err <= tol) & ~(out.weight.to(F64) == ref["weight"])     # equal infs are a match
    assert not bad.any(), (f"{what} weight: {int(bad.sum())} off; worst row {int((err / tol).argmax())}: "
                           f"{out.weight[bad][0].item()!r} vs {ref['weight'][bad][0].item()!r}")


# --------------------------------------------------------------------------- f′ in 60-digit arithmetic

def textbook_f_prime(d: Divergence, log_t: float) -> mpmath.mpf:
    """f′(t) as the textbook writes it, in 60-digit arithmetic."""
    lt = mpmath.mpf(log_t)
    t = mpmath.exp(lt)
    if d.name == "kl":
        return -1 / t
    if d.name == "rkl":
        return mpmath.log(t) + 1
    if d.name == "tv":
        return mpmath.sign(t - 1) / 2
    if d.name == "js":
        return mpmath.log(2 * t / (1 + t)) / 2
    if d.name == "chi2":
        return 1 - 1 / t ** 2
    if d.name == "rchi2":
        return 2 * (t - 1)
    if d.name == "hellinger":
        return 1 - 1 / mpmath.sqrt(t)
    a = mpmath.mpf(d.alpha_value)
    return (t ** (a - 1) - 1) / (a - 1)


def to_f32_range(values: list) -> torch.Tensor:
    """mp values -> float64 tensor, ±inf where |value| is beyond float32 (what an honest float32 result is)."""
    out = []
    for v in values:
        out.append(math.copysign(math.inf, v) if abs(v) > F32_MAX else float(v))
    return torch.tensor(out, dtype=F64)


def assert_f32_result(got: torch.Tensor, exact: list, *, rtol: float, atol: torch.Tensor | float, name: str):
    """got (float32) equals the exact values: ±inf where they are beyond float32, else within tolerance.

    Values within 1e-4 of float32's largest number are skipped (either answer is honest there), and values
    below its smallest normal number (1.2e-38) may underflow (to a subnormal or 0).
    """
    want = to_f32_range(exact)
    mag = torch.tensor([abs(float(v)) if abs(v) < 1e300 else math.inf for v in exact], dtype=F64)
    borderline = (mag > F32_MAX * (1 - 1e-4)) & (mag < F32_MAX * (1 + 1e-4))
    got = got.to(F64)
    assert not torch.isnan(got).any(), f"{name}: NaN at {torch.nonzero(torch.isnan(got)).flatten().tolist()}"
    inf = torch.isinf(want) & ~borderline
    assert torch.equal(got[inf], want[inf]), f"{name}: beyond float32 must be ±inf: {got[inf]} vs {want[inf]}"
    fin = ~torch.isinf(want) & ~borderline
    atol = atol[fin] if isinstance(atol, torch.Tensor) else atol
    err, bound = (got[fin] - want[fin]).abs(), atol + rtol * want[fin].abs() + F32_TINY
    bad = ~(err <= bound)
    assert not bad.any(), (f"{name}: {int(bad.sum())} off; first: {got[fin][bad][0].item()!r} vs "
                           f"{want[fin][bad][0].item()!r}")


def log_t_grid() -> torch.Tensor:
    """float32 log t values: 0, tiny, ±[1e-20, 1e4] log-spaced, the float32 overflow edges, random."""
    g = torch.Generator().manual_seed(0)
    mags = torch.cat([torch.logspace(-20, 4, 241, dtype=F64), torch.tensor([44.0, 44.5, 88.0, 88.7, 89.0, 100.0,
                                                                            176.0, 178.0, 1e4])])
    rand = (torch.rand(200, generator=g, dtype=F64) * 2 - 1) * 1e4
    return torch.cat([torch.zeros(1, dtype=F64), mags, -mags, rand]).float()
