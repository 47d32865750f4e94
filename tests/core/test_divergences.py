"""fdpg_scale.core.divergences: f′ against autograd, f(1) = 0, convexity, float32 range, limits, exact D_f, errors.

The reference for every derivative is autograd through the *textbook* f written directly in t (not in
log t) in float64: torch's expm1 backward is grad·(expm1(x) + 1), which loses the relative precision of
e^x for very negative x, so differentiating the package's own log-space forms is only done on |log t| ≤ 5.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import mpmath
import pytest
import torch

import fdpg_scale.kernels
from fdpg_scale.core.divergences import DIVERGENCE_NAMES, Divergence, get_divergence
from fdpg_scale.kernels.f_prime import FPRIME_NAMES, KERNEL_IDS
from tests.helpers import assert_close

F64 = torch.float64
F32_MAX = torch.finfo(torch.float32).max
ALPHAS = (-0.5, 0.5, 2.0, 3.0)


def _all_divergences() -> list[Divergence]:
    return ([get_divergence(n) for n in DIVERGENCE_NAMES if n != "alpha"]
            + [get_divergence("alpha", alpha=a) for a in ALPHAS])


DIVERGENCES = _all_divergences()
IDS = [str(d) for d in DIVERGENCES]


def textbook_f(d: Divergence, t: torch.Tensor) -> torch.Tensor:
    """f(t) exactly as docs/method.md §2's table writes it (t, not log t)."""
    if d.name == "kl":
        return -torch.log(t)
    if d.name == "rkl":
        return t * torch.log(t)
    if d.name == "tv":
        return 0.5 * torch.abs(t - 1)
    if d.name == "js":
        return 0.5 * (t * torch.log(2 * t / (1 + t)) + torch.log(2 / (1 + t)))
    if d.name == "chi2":
        return (1 - t) ** 2 / t
    if d.name == "rchi2":
        return (t - 1) ** 2
    if d.name == "hellinger":
        return (torch.sqrt(t) - 1) ** 2
    a = d.alpha_value
    return (t ** a - a * t - (1 - a)) / (a * (a - 1))


def textbook_df(d: Divergence, log_t: torch.Tensor) -> torch.Tensor:
    """df/dt by autograd through textbook_f in float64, at t = exp(log_t)."""
    t = torch.exp(log_t.to(F64)).requires_grad_(True)
    (grad,) = torch.autograd.grad(textbook_f(d, t).sum(), t)
    return grad


# ------------------------------------------------------------------------------------------------------
# f′ is the derivative of f
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", DIVERGENCES, ids=IDS)
def test_f_prime_is_autograd_derivative_of_textbook_f(d):
    # Grid avoids log t = 0 exactly, where tv's |t − 1| has no derivative (checked separately below).
    log_t = torch.linspace(-20, 20, 4001, dtype=F64) + 1e-3
    assert_close(d.f_prime(log_t), textbook_df(d, log_t), rtol=1e-9, atol=1e-12, name=f"{d} f′")


@pytest.mark.parametrize("d", DIVERGENCES, ids=IDS)
def test_f_matches_textbook_f(d):
    log_t = torch.linspace(-20, 20, 4001, dtype=F64)
    # Textbook forms lose absolute precision ~1e-16·(size of their terms) by cancellation near t = 1.
    assert_close(d.f(log_t), textbook_f(d, torch.exp(log_t)), rtol=1e-9, atol=1e-11, name=f"{d} f")


@pytest.mark.parametrize("d", DIVERGENCES, ids=IDS)
def test_f_prime_is_chain_rule_of_own_f(d):
    """d f(log t)/d log t · e^(−log t) = f′: the package's f and f′ agree with each other."""
    log_t = (torch.linspace(-5, 5, 1001, dtype=F64) + 1e-3).requires_grad_(True)
    (df_dlog_t,) = torch.autograd.grad(d.f(log_t).sum(), log_t)
    with torch.no_grad():
        assert_close(d.f_prime(log_t), df_dlog_t * torch.exp(-log_t), rtol=1e-9, atol=1e-12, name=f"{d}")


def test_tv_f_prime_at_one_is_a_subgradient():
    d = get_divergence("tv")
    assert d.f_prime(torch.zeros(1, dtype=F64)).item() == 0.0


# ------------------------------------------------------------------------------------------------------
# f(1) = 0, convexity, float32 range
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", DIVERGENCES, ids=IDS)
def test_f_of_one_is_zero(d):
    for dtype in (torch.float32, F64):
        assert d.f(torch.zeros(3, dtype=dtype)).abs().max().item() == 0.0, f"{d} f(1) != 0 in {dtype}"


@pytest.mark.parametrize("d", DIVERGENCES, ids=IDS)
def test_f_prime_nondecreasing_convexity(d):
    """f convex ⟺ f′(t) nondecreasing in t ⟺ d f′/d log t ≥ 0 (t increases with log t)."""
    log_t = torch.linspace(-20, 20, 4001, dtype=F64).requires_grad_(True)
    fp = d.f_prime(log_t)
    (f2,) = torch.autograd.grad(fp.sum(), log_t)
    assert f2.min().item() >= 0.0, f"{d}: d f′/d log t = {f2.min().item()} < 0 at log t = " \
                                   f"{log_t[f2.argmin()].item()}"
    steps = fp.detach().diff()
    assert steps.min().item() >= -1e-12 * fp.detach().abs().max().item(), f"{d}: f′ decreases"
    # f itself: second differences on a grid in t are ≥ 0 (up to rounding).
    t = torch.linspace(0.05, 20, 2001, dtype=F64)
    f = d.f(torch.log(t))
    second = f[2:] - 2 * f[1:-1] + f[:-2]
    assert second.min().item() >= -1e-9, f"{d}: f not convex (second difference {second.min().item()})"


# alpha's f / f′ divide an expm1 that alone overflows float32 on a window where the quotient fits
# (kernels/f_prime.py's expm1_over handles it): this test covers that window for α = 2, 3.
def _range_cases():
    for d in DIVERGENCES:
        for fn in ("f", "f_prime"):
            yield pytest.param(d, fn, id=f"{d}-{fn}")


@pytest.mark.parametrize("d,fn", list(_range_cases()))
def test_float32_finite_and_accurate_over_pm80(d, fn):
    """In float32 on log t ∈ [−80, 80]: finite wherever the true (float64) value fits in float32, and close."""
    log_t32 = torch.linspace(-80, 80, 160001, dtype=torch.float32)
    true = getattr(d, fn)(log_t32.to(F64))                 # the same float32 points, evaluated in float64
    got = getattr(d, fn)(log_t32).to(F64)
    fits = true.abs() < F32_MAX
    bad = fits & ~torch.isfinite(got)
    assert not bad.any(), f"{d}.{fn}: {int(bad.sum())} non-finite float32 values where the true value fits, " \
                          f"log t in [{log_t32[bad].min().item()}, {log_t32[bad].max().item()}]"
    # rtol: alpha rounds α·log t to float32 (relative error ≤ 80·2^−24 after exp, 3.9e-6 measured); atol:
    # f near t = 1 subtracts terms of size |log t| to get a value of size log²t (absolute error ~1e-7).
    assert_close(got[fits], true[fits], rtol=1e-5, atol=1e-6, name=f"{d}.{fn} float32")


def _nan_cases():
    for d in DIVERGENCES:
        for fn in ("f", "f_prime"):
            yield pytest.param(d, fn, id=f"{d}-{fn}")


@pytest.mark.parametrize("d,fn", list(_nan_cases()))
def test_nan_stays_nan(d, fn):
    """A NaN log t (a bug upstream) must not turn into a plausible number."""
    out = getattr(d, fn)(torch.tensor([float("nan"), 0.5]))
    assert torch.isnan(out[0]) and torch.isfinite(out[1]), out


# ------------------------------------------------------------------------------------------------------
# alpha's limits, kernel ids
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [1e-6, -1e-6])
def test_alpha_limits_are_kl_and_rkl(eps):
    """α → 0: f′ → kl's f′ + 1 and f → kl's f + (t − 1); α → 1: f′ → rkl's f′ − 1, f → rkl's f − (t − 1).

    The extra (t − 1) in alpha's f has E_p[t − 1] = 0, so it changes neither D_f nor the gradient direction
    beyond the constant it adds to f′ (a baseline).
    """
    log_t = torch.linspace(-5, 5, 1001, dtype=F64)
    t_m1 = torch.expm1(log_t)
    kl, rkl = get_divergence("kl"), get_divergence("rkl")
    near0, near1 = get_divergence("alpha", alpha=eps), get_divergence("alpha", alpha=1 + eps)
    # The limit error is O(ε·log²t·max(t, 1/t)) ≈ 1e-6·25·150 at |log t| = 5.
    tol = dict(rtol=1e-4, atol=5e-3)
    assert_close(near0.f_prime(log_t), kl.f_prime(log_t) + 1, **tol, name="alpha→0 f′")
    assert_close(near0.f(log_t), kl.f(log_t) + t_m1, **tol, name="alpha→0 f")
    assert_close(near1.f_prime(log_t), rkl.f_prime(log_t) - 1, **tol, name="alpha→1 f′")
    assert_close(near1.f(log_t), rkl.f(log_t) - t_m1, **tol, name="alpha→1 f")
    # ... and the limit is approached: halving ε halves the distance (a tolerance check alone could hide
    # a formula that is merely close).
    far = get_divergence("alpha", alpha=1 + 64 * eps)
    gap_far = (far.f_prime(log_t) - rkl.f_prime(log_t) + 1).abs().max().item()
    gap_near = (near1.f_prime(log_t) - rkl.f_prime(log_t) + 1).abs().max().item()
    assert 30 < gap_far / gap_near < 130, (gap_far, gap_near)


def test_kernel_ids_come_from_the_kernels_table():
    """One registry: the kernels own the ids (and f′); the math layer reads them, never the reverse."""
    assert DIVERGENCE_NAMES == FPRIME_NAMES
    for name in DIVERGENCE_NAMES:
        d = get_divergence(name, alpha=0.5 if name == "alpha" else None)
        assert d.kernel_id == KERNEL_IDS[name] and d.fprime_spec.name == name, name
    for f in Path(fdpg_scale.kernels.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                assert not name.startswith("fdpg_scale") or name.startswith("fdpg_scale.kernels"), \
                    f"kernels/{f.name} imports {name}: the kernels import nothing from the layers above"


@pytest.mark.parametrize("d", DIVERGENCES, ids=IDS)
def test_f_prime_matches_60_digit_textbook_over_float64_range(d):
    """d.f_prime in float64 (the kernels' torch forms, no clamp) against the textbook f′(t) in mpmath, for
    |log t| up to 700 (t itself up to e^±700): the stable forms lose nothing at large |log t|."""
    mpmath.mp.dps = 60
    mags = torch.logspace(-12, math.log10(700), 300, dtype=F64)
    log_t = torch.cat([torch.zeros(1, dtype=F64), mags, -mags])
    got = d.f_prime(log_t)
    want = []
    for v in log_t.tolist():
        t = mpmath.exp(mpmath.mpf(v))
        fp = {"kl": lambda: -1 / t, "rkl": lambda: mpmath.log(t) + 1, "tv": lambda: mpmath.sign(t - 1) / 2,
              "js": lambda: mpmath.log(2 * t / (1 + t)) / 2, "chi2": lambda: 1 - 1 / t ** 2,
              "rchi2": lambda: 2 * (t - 1), "hellinger": lambda: 1 - 1 / mpmath.sqrt(t),
              "alpha": lambda: (t ** (d.alpha_value - 1) - 1) / (d.alpha_value - 1)}[d.name]()
        want.append(math.copysign(math.inf, fp) if abs(fp) > 1.7e308 else float(fp))
    want = torch.tensor(want, dtype=F64)
    # rtol: exp of a float64 argument up to ~2100 (3·700 for alpha(3)) rounded once: 2100·1.1e-16.
    assert_close(got, want, rtol=1e-12, atol=1e-15, name=f"{d} f′ vs mpmath")


@pytest.mark.parametrize("d", DIVERGENCES, ids=IDS)
def test_f_prime_at_infinity_is_the_limit(d):
    """log t = +inf (a sample outside the support): f′(∞) = kl 0, tv ½, js ½ log 2, chi2 1, hellinger 1,
    alpha(α < 1) 1/(1 − α); +inf for rkl, rchi2, alpha(α > 1). fprime_spec.limit_at_infinity says the same."""
    limits = {"kl": 0.0, "tv": 0.5, "js": 0.5 * math.log(2), "chi2": 1.0, "hellinger": 1.0}
    if d.name == "alpha":
        limit = 1 / (1 - d.alpha_value) if d.alpha_value < 1 else math.inf
    else:
        limit = limits.get(d.name, math.inf)
    for dtype in (torch.float32, F64):
        got = d.f_prime(torch.tensor([math.inf], dtype=dtype)).item()
        assert got == pytest.approx(limit, rel=1e-7), (d, dtype, got)
    spec_limit = d.fprime_spec.limit_at_infinity
    assert (spec_limit is None) == math.isinf(limit) and (spec_limit is None or spec_limit == pytest.approx(limit))
    # ... and it is approached: f′ at log t = 60 is within e^-30 of it (the slowest: hellinger, e^{−lt/2}).
    if not math.isinf(limit):
        assert d.f_prime(torch.tensor([60.0], dtype=F64)).item() == pytest.approx(limit, abs=1e-12)


def test_kernel_ids_distinct_and_alpha_value():
    ids = [get_divergence(n, alpha=0.5 if n == "alpha" else None).kernel_id for n in DIVERGENCE_NAMES]
    assert sorted(ids) == list(range(len(DIVERGENCE_NAMES))), ids
    assert get_divergence("alpha", alpha=-0.5).alpha_value == -0.5
    assert get_divergence("js").alpha_value == 0.0
    d = get_divergence("hellinger")
    assert get_divergence(d) is d


# ------------------------------------------------------------------------------------------------------
# Exact D_f on discrete distributions against textbook formulas
# ------------------------------------------------------------------------------------------------------

def _textbook_divergence(d: Divergence, pi: torch.Tensor, p: torch.Tensor) -> float:
    kl = lambda a, b: (a * torch.log(a / b)).sum()  # noqa: E731
    if d.name == "kl":
        v = kl(p, pi)
    elif d.name == "rkl":
        v = kl(pi, p)
    elif d.name == "tv":
        v = 0.5 * (p - pi).abs().sum()
    elif d.name == "js":
        m = 0.5 * (p + pi)
        v = 0.5 * kl(pi, m) + 0.5 * kl(p, m)
    elif d.name == "chi2":
        v = ((p - pi) ** 2 / pi).sum()
    elif d.name == "rchi2":
        v = ((pi - p) ** 2 / p).sum()
    elif d.name == "hellinger":
        v = ((p.sqrt() - pi.sqrt()) ** 2).sum()
    else:  # Amari: Σ p f(π/p) = (Σ π^α p^(1−α) − 1) / (α(α − 1))
        a = d.alpha_value
        v = ((pi ** a * p ** (1 - a)).sum() - 1) / (a * (a - 1))
    return float(v)


@pytest.mark.parametrize("d", DIVERGENCES, ids=IDS)
def test_exact_divergence_on_discrete_distributions(d):
    gen = torch.Generator().manual_seed(0)
    for size in (2, 7, 50):
        p = torch.rand(size, generator=gen, dtype=F64) + 0.05
        pi = torch.rand(size, generator=gen, dtype=F64) + 0.05
        p, pi = p / p.sum(), pi / pi.sum()
        got = float((p * d.f(torch.log(pi) - torch.log(p))).sum())      # D_f(π‖p) = E_p[f(π/p)]
        want = _textbook_divergence(d, pi, p)
        assert want > 0 and math.isclose(got, want, rel_tol=1e-10, abs_tol=1e-14), (size, got, want)
        assert float((p * d.f(torch.zeros(size, dtype=F64))).sum()) == 0.0     # D_f(p‖p) = 0


# ------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------

def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown divergence 'kl2'") as err:
        get_divergence("kl2")
    for name in DIVERGENCE_NAMES:
        assert name in str(err.value)


def test_alpha_needs_alpha_and_points_to_limits():
    with pytest.raises(ValueError, match="needs alpha=.*'kl'.*'rkl'"):
        get_divergence("alpha")
    with pytest.raises(ValueError, match="alpha=0 .*use divergence 'kl'"):
        get_divergence("alpha", alpha=0.0)
    with pytest.raises(ValueError, match="alpha=1 .*use divergence 'rkl'"):
        get_divergence("alpha", alpha=1)
    with pytest.raises(ValueError, match="finite alpha"):
        get_divergence("alpha", alpha=float("nan"))
    with pytest.raises(ValueError, match="'js' takes no alpha"):
        get_divergence("js", alpha=0.5)


def test_the_public_path_re_exports_every_name_of_the_core_module():
    import fdpg_scale.core.divergences as core
    import fdpg_scale.divergences as public

    assert public.__all__ == core.__all__
    assert all(getattr(public, name) is getattr(core, name) for name in core.__all__)
