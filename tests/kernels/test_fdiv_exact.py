"""fdiv_weights without a clamp: exact f′ inside the support, exact limits or a chosen penalty outside it.

The oracle is mpmath at 60 digits on the *textbook* f′(t) with t = exp(log t) (no log-space rewriting), so
it is independent of the package's stable forms and reaches |log t| = 1e4, where t is far outside float64.
Both implementations (torch reference and the Triton kernel in the interpreter) are checked against it.
Inputs are dyadic (multiples of 1/64) wherever a sum or difference is formed, so log t and log ρ are exact in
float32 and the tolerances measure only the f′/exp evaluation.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from fdpg_scale.core.divergences import get_divergence
from fdpg_scale.kernels import fdiv_weights
from tests.kernels.helpers import DIVERGENCES, F64, IDS, UNBOUNDED, assert_f32_result, log_t_grid, textbook_f_prime

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")

IMPLS = ("torch", "triton")
LIMITS = {"kl": 0.0, "tv": 0.5, "js": 0.5 * math.log(2), "chi2": 1.0, "hellinger": 1.0,
          "alpha(-0.5)": 1 / 1.5, "alpha(0.5)": 1 / 0.5}   # f′(∞), written out from the formulas



def dyadic(lo: float, hi: float, n: int, g: torch.Generator) -> torch.Tensor:
    return (torch.randint(int(lo * 64), int(hi * 64) + 1, (n,), generator=g) / 64.0).float()


# ------------------------------------------------------------------------------------------------------
# f′ inside the support, |log t| up to 1e4
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("d", DIVERGENCES, ids=IDS)
def test_pseudo_reward_is_exact_f_prime(d, impl):
    """r = −f′(log t) for every float32 log t in ±1e4: ±inf exactly where −f′ is beyond float32, never NaN."""
    lt = log_t_grid()
    out = fdiv_weights(lt, lt, torch.zeros_like(lt), 0.0, d, impl=impl)
    assert torch.equal(out.log_t, lt), "log t must be passed through unclamped"
    exact = [-textbook_f_prime(d, v) for v in lt.tolist()]
    # rtol: exp of a float32 argument of size ≤ 89 that was rounded once (κ·log t, y − log|c|): ≤ 89·2^-24;
    # atol: js/chi2/hellinger/alpha near t = 1 cancel to absolute float32 rounding.
    assert_f32_result(out.pseudo_reward, exact, rtol=1e-5, atol=1e-6, name=f"{d}/{impl} r")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("d", DIVERGENCES, ids=IDS)
def test_pseudo_reward_is_autograd_of_core_f(d, impl):
    """Each kernel id's f′ is the derivative of fdpg_scale.core.divergences' f for the same divergence:
    f′(t) = (d f / d log t)·e^(−log t), by float64 autograd through the package's f, for |log t| ≤ 20:
    torch's expm1 backward is grad·(expm1(x) + 1), whose absolute rounding (1e-16) the factor e^(−log t)
    magnifies beyond that (test_pseudo_reward_is_exact_f_prime covers |log t| up to 1e4)."""
    lt = log_t_grid()
    lt = lt[lt.abs() <= 20]
    x = lt.to(F64).requires_grad_(True)
    (df_dlog_t,) = torch.autograd.grad(d.f(x).sum(), x)
    want = -(df_dlog_t * torch.exp(-x.detach()))
    out = fdiv_weights(lt, lt, torch.zeros_like(lt), 0.0, d, impl=impl)
    assert_f32_result(out.pseudo_reward, want.tolist(), rtol=1e-5, atol=1e-6, name=f"{d}/{impl} r vs autograd")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("d", DIVERGENCES, ids=IDS)
def test_weight_is_exact_where_f_prime_overflows(d, impl):
    """w = ρ·(B + f′) against 60-digit arithmetic, where ρ, f′ or both leave float32: finite whenever the true
    weight is (kl at log t = −1e4 with ρ = e^(−1e4 + 10) has w = −e^10), ±inf only where it is not."""
    g = torch.Generator().manual_seed(1)
    n = 600
    lt = torch.cat([dyadic(-1e4, 1e4, n // 2, g), dyadic(-200, 200, n // 2, g)])
    log_p = dyadic(-50, 0, n, g)
    log_rho = torch.where(torch.rand(n, generator=g) < 0.5, dyadic(-120, 120, n, g),
                          -torch.sign(lt) * (lt.abs() - dyadic(-40, 40, n, g)))    # ρ cancels f′'s growth
    log_rho = log_rho.clamp(-1e4, 1e4)
    logp_pi = lt + log_p
    logp_q = logp_pi - log_rho
    baseline = torch.where(torch.rand(n, generator=g) < 0.5, 0.5, -2.0)
    out = fdiv_weights(logp_pi, logp_q, log_p, 0.0, d, baseline=baseline, impl=impl)
    assert torch.equal(out.log_t, lt) and torch.equal(logp_pi - logp_q, log_rho), "inputs must be exact"
    exact, atol = [], []
    for l, r, b in zip(lt.tolist(), log_rho.tolist(), baseline.tolist()):
        rho, fp = mpmath.exp(mpmath.mpf(r)), textbook_f_prime(d, l)
        exact.append(rho * (b + fp))
        # float32 evaluation of B − r (r to 1e-5 relative), then ×ρ; see test_fdiv_weights.assert_matches_naive
        atol.append(float(min(rho * (1e-5 * abs(fp) + 1e-6 * abs(b) + 1e-6), mpmath.mpf(1e300))))
    assert_f32_result(out.weight, exact, rtol=2e-5, atol=torch.tensor(atol, dtype=F64), name=f"{d}/{impl} w")


@pytest.mark.parametrize("impl", IMPLS)
def test_rkl_and_js_are_exact_at_log_t_minus_100(impl):
    """The ±80 clamp gave rkl r = 79 and js r = 39.65 at log t = −100; the exact values are 99 and
    ½(softplus(100) − log 2) = 49.6534264097..."""
    lt = torch.tensor([-100.0])
    rkl = fdiv_weights(lt, lt, torch.zeros(1), 0.0, "rkl", impl=impl)
    js = fdiv_weights(lt, lt, torch.zeros(1), 0.0, "js", impl=impl)
    assert rkl.pseudo_reward.item() == 99.0
    exact_js = 0.5 * (100 + math.log1p(math.exp(-100)) - math.log(2))
    assert exact_js == pytest.approx(49.6534264097, rel=1e-11)
    assert js.pseudo_reward.item() == pytest.approx(exact_js, rel=1e-7)       # float32: ½ ulp is 3.8e-8


# ------------------------------------------------------------------------------------------------------
# Outside the support (log P = −inf)
# ------------------------------------------------------------------------------------------------------

def _outside_batch():
    """Rows 0-3 outside the support with ρ = 1, e^−100, e^80, e^100; row 4 inside (log t = 0)."""
    logp_pi = torch.tensor([-3.0, -3.0, -3.0, -3.0, -3.0])
    logp_q = torch.tensor([-3.0, 97.0, -83.0, -103.0, -3.0])
    log_target = torch.tensor([float("-inf")] * 4 + [-3.0])
    return logp_pi, logp_q, log_target


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("d", [d for d in DIVERGENCES if str(d) not in UNBOUNDED], ids=str)
def test_outside_support_uses_exact_limit(d, impl):
    """kl → 0, tv → ½, js → ½ log 2, chi2 → 1, hellinger → 1, alpha(α < 1) → 1/(1 − α); log t reported +inf."""
    limit = LIMITS[str(d)]
    assert d.fprime_spec.limit_at_infinity == pytest.approx(limit, rel=1e-15)
    assert d.f_prime(torch.tensor([math.inf], dtype=F64)).item() == pytest.approx(limit, rel=1e-15)
    logp_pi, logp_q, log_target = _outside_batch()
    baseline = torch.tensor([0.25, 0.25, 0.25, -limit, 0.25])   # row 3: ρ = e^100 (inf) times a zero coefficient
    out = fdiv_weights(logp_pi, logp_q, log_target, 0.0, d, baseline=baseline, impl=impl,
                       outside_support_reward=-1234.0)        # not used: the limit is finite
    assert out.log_t.tolist()[:4] == [math.inf] * 4 and out.log_t[4].item() == 0.0
    r32 = torch.tensor(-limit, dtype=torch.float32).item()
    assert out.pseudo_reward.tolist()[:4] == [r32] * 4
    exact = [mpmath.exp(mpmath.mpf(r)) * (mpmath.mpf(b) - mpmath.mpf(r32))     # w = ρ·(B − r), r as reported
             for r, b in zip((0.0, -100.0, 80.0, 100.0), baseline.tolist()[:4])]
    assert_f32_result(out.weight[:4], exact, rtol=2e-5, atol=1e-45, name=f"{d}/{impl} outside w")
    assert out.weight[3].item() == 0.0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("d", [d for d in DIVERGENCES if str(d) in UNBOUNDED], ids=str)
def test_outside_support_penalty_is_explicit(d, impl):
    """rkl, rchi2, alpha(α > 1): f′(∞) = +∞. No penalty given: ValueError naming the argument; given: r = it."""
    assert d.fprime_spec.limit_at_infinity is None
    assert d.f_prime(torch.tensor([math.inf], dtype=F64)).item() == math.inf
    logp_pi, logp_q, log_target = _outside_batch()
    with pytest.raises(ValueError, match=r"4 sample\(s\) lie outside the target's support .*outside_support_reward="):
        fdiv_weights(logp_pi, logp_q, log_target, 0.0, d, impl=impl)
    # A batch inside the support needs no penalty.
    inside = fdiv_weights(logp_pi, logp_q, torch.full((5,), -3.0), 0.0, d, impl=impl)
    assert not torch.isnan(inside.weight).any()
    out = fdiv_weights(logp_pi, logp_q, log_target, 0.0, d, baseline=0.5, outside_support_reward=-20.0, impl=impl)
    assert out.pseudo_reward.tolist()[:4] == [-20.0] * 4
    exact = [mpmath.exp(mpmath.mpf(r)) * mpmath.mpf(20.5) for r in (0.0, -100.0, 80.0, 100.0)]
    assert_f32_result(out.weight[:4], exact, rtol=2e-5, atol=1e-45, name=f"{d}/{impl} penalty w")
    # An explicit clip clamps the penalty like any pseudo-reward.
    clipped = fdiv_weights(logp_pi, logp_q, log_target, 0.0, d, clip=5.0, outside_support_reward=-20.0, impl=impl)
    assert clipped.pseudo_reward.tolist()[:4] == [-5.0] * 4


@pytest.mark.parametrize("value,exc,match", [(float("nan"), ValueError, "finite"), (math.inf, ValueError, "finite"),
                                             ("-20", TypeError, "None or a float"), (True, TypeError, "None or a float")])
def test_outside_support_reward_bad_value(value, exc, match):
    x = torch.zeros(2)
    with pytest.raises(exc, match=f"outside_support_reward must be {match}" if exc is TypeError else match):
        fdiv_weights(x, x, x, 0.0, "rkl", outside_support_reward=value)


# ------------------------------------------------------------------------------------------------------
# No NaN from finite inputs
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_no_nan_from_finite_inputs(impl):
    """Random finite log-probs up to ±1e4 (any log t, any ρ), baselines of both signs, every divergence,
    plus P = 0 rows: weight and pseudo-reward are never NaN. (400 rows through the interpreter, which runs
    each 16-row program in Python: 2000 took 113 s there; the torch path takes all 2000.)"""
    g = torch.Generator().manual_seed(2)
    n = 2000 if impl == "torch" else 400
    scale = 10.0 ** torch.randint(0, 5, (3, n), generator=g).float()
    logp_pi, logp_q, log_target = (torch.rand(3, n, generator=g) * 2 - 1) * scale
    log_target[::17] = float("-inf")
    baseline = (torch.rand(n, generator=g) * 2 - 1) * 10.0 ** torch.randint(-3, 4, (n,), generator=g).float()
    baseline[::5] = 0.0
    for d in DIVERGENCES:
        out = fdiv_weights(logp_pi, logp_q, log_target, 1.5, d, baseline=baseline, outside_support_reward=-30.0,
                           impl=impl)
        for field in ("weight", "pseudo_reward", "importance_ratio", "log_t"):
            x = getattr(out, field)
            assert not torch.isnan(x).any(), (f"{d}/{impl}: NaN {field} at rows "
                                              f"{torch.nonzero(torch.isnan(x)).flatten()[:5].tolist()}")


# ------------------------------------------------------------------------------------------------------
# The expected gradient on a reward target with β = 0.015 (|log t| ≫ 80)
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_reward_target_expected_rkl_gradient_is_exact(impl):
    """Enumerable toy: 27 sequences, π = softmax(θ), P = a·exp(r/β) with β = 0.015 (r/β up to 100).

    Σ_x π(x)·w(x)·∇_θ log π(x) (on-policy, ρ = 1, B = 0: the estimator's expectation, summed exactly) must equal
    ∇_θ KL(π‖p) by autograd. With the old ±80 clamp of log t the same sum is off by 0.20 on this toy
    (asserted > 0.1, so the toy really exercises |log t| > 80; kernels/README.md's reward toy measured 0.79).
    """
    g = torch.Generator().manual_seed(3)
    n = 27
    log_a = torch.log_softmax(torch.randn(n, generator=g, dtype=F64), 0)
    reward = torch.rand(n, generator=g, dtype=F64) * 1.5
    log_big_p = log_a + reward / 0.015
    log_z = torch.logsumexp(log_big_p, 0)
    theta = (torch.randn(n, generator=g, dtype=F64) * 2).requires_grad_(True)
    log_pi = torch.log_softmax(theta, 0)
    rkl = get_divergence("rkl")
    exact_kl = (torch.exp(log_big_p - log_z) * rkl.f(log_pi - (log_big_p - log_z))).sum()   # E_p[f(π/p)]
    (exact,) = torch.autograd.grad(exact_kl, theta)
    lp = log_pi.detach()
    assert (lp - (log_big_p - log_z)).abs().max() > 90, "the toy must reach |log t| > 80"

    def expected_grad(w: torch.Tensor) -> torch.Tensor:
        pi = lp.exp()
        # ∇_θ log π(x) = e_x − π for a softmax over sequences
        return (pi * w)[:, None].mul(torch.eye(n, dtype=F64) - pi[None, :]).sum(0)

    out = fdiv_weights(lp.float(), lp.float(), log_big_p.float(), log_z.float(), rkl, impl=impl)
    got = expected_grad(out.weight.to(F64))
    rel = ((got - exact).norm() / exact.norm()).item()
    assert rel < 1e-5, f"expected rkl gradient off by {rel:.2e} (relative)"
    clamped = rkl.f_prime((lp - (log_big_p - log_z)).clamp(-80, 80))      # what the old clamp computed
    old_rel = ((expected_grad(clamped) - exact).norm() / exact.norm()).item()
    assert old_rel > 0.1, f"the clamp should have mattered on this toy, relative error only {old_rel:.2e}"
