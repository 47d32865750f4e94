"""The f′ table the kernels own: one id per divergence, f′(log t) in stable log-space forms, limits at t → ∞.

A divergence, for the f-DPG gradient, *is* its f′ (Theorem 1 of Go et al. 2023: ∇D_f(π‖p) =
E_π[f′(π/p) ∇log π]). The Triton kernel selects f′ by a compile-time id; the torch forms below are its
reference and the CPU path, and ``fdpg_scale.core.divergences`` takes its ids and f′ from here (the
math layer imports the kernels, never the reverse). Conventions: D_f(π‖p) = E_p[f(t)], t = π/p, textbook
scaling; every formula takes lt = log t and exponentiates only what it must (docs/method.md §2).

    id  name       f′(t)                    in log space (lt = log t)             f′(t → ∞)
    0   kl         −1/t                     −exp(−lt)                             0
    1   rkl        log t + 1                lt + 1                                +∞
    2   tv         ½ sign(t − 1)            ½ sign(lt)                            ½
    3   js         ½ log(2t/(1+t))          ½(log 2 − softplus(−lt))              ½ log 2
    4   chi2       1 − 1/t²                 −expm1(−2 lt)                         1
    5   rchi2      2(t − 1)                 2 expm1(lt)                           +∞
    6   hellinger  1 − 1/√t                 −expm1(−lt/2)                         1
    7   alpha      (t^(α−1) − 1)/(α − 1)    expm1((α−1) lt)/(α − 1)               1/(1 − α) if α < 1, +∞ if α > 1

No form is clamped: each is finite wherever its true value fits the dtype (tv, js and rkl can only
overflow at lt = ±inf). The exponential ones (kl, chi2, rchi2, hellinger, alpha) are

    f′ = c₀ + c₁·exp(κ·lt)          (``ExpForm``: kl κ=−1, chi2 −2, rchi2 1, hellinger −½, alpha α−1)

which ``fdiv_weights`` uses to form ρ·f′ = c₁·exp(log ρ + κ·lt) in log space where f′ alone overflows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["KERNEL_IDS", "FPRIME_NAMES", "ALPHA_ID", "ExpForm", "FPrimeSpec", "fprime_spec", "f_prime_torch",
           "expm1_over", "softplus_exact"]

KERNEL_IDS: dict[str, int] = {"kl": 0, "rkl": 1, "tv": 2, "js": 3, "chi2": 4, "rchi2": 5, "hellinger": 6,
                              "alpha": 7}
"""Divergence name -> the id the Triton kernel switches on (a tl.constexpr)."""
FPRIME_NAMES: tuple[str, ...] = tuple(KERNEL_IDS)
ALPHA_ID = KERNEL_IDS["alpha"]
_NAME_OF = {i: n for n, i in KERNEL_IDS.items()}
_LOG2 = math.log(2.0)


@dataclass(frozen=True)
class ExpForm:
    """f′(lt) = c0 + c1·exp(kappa·lt): the shape of the exponential divergences' f′."""

    kappa: float
    c0: float
    c1: float


@dataclass(frozen=True)
class FPrimeSpec:
    """Which f′ to use: a kernel id, and α for the ``alpha`` id (0.0 otherwise)."""

    kernel_id: int
    alpha: float = 0.0

    def __post_init__(self):
        if self.kernel_id not in _NAME_OF:
            raise ValueError(f"unknown f′ kernel id {self.kernel_id!r}; valid ids: 0..{len(KERNEL_IDS) - 1} "
                             f"({', '.join(FPRIME_NAMES)})")
        a = float(self.alpha)
        if self.kernel_id == ALPHA_ID and not (math.isfinite(a) and a not in (0.0, 1.0)):
            raise ValueError(f"divergence 'alpha' needs a finite alpha ∉ {{0, 1}} (0 is 'kl', 1 is 'rkl'), "
                             f"got {self.alpha!r}")
        if self.kernel_id != ALPHA_ID and a != 0.0:
            raise ValueError(f"divergence {self.name!r} takes no alpha, got alpha={self.alpha!r}")

    @property
    def name(self) -> str:
        return _NAME_OF[self.kernel_id]

    @property
    def exp_form(self) -> ExpForm | None:
        """(κ, c₀, c₁) for the exponential f′ (kl, chi2, rchi2, hellinger, alpha); None for rkl, tv, js."""
        name = self.name
        if name == "kl":
            return ExpForm(kappa=-1.0, c0=0.0, c1=-1.0)
        if name == "chi2":
            return ExpForm(kappa=-2.0, c0=1.0, c1=-1.0)
        if name == "rchi2":
            return ExpForm(kappa=1.0, c0=-2.0, c1=2.0)
        if name == "hellinger":
            return ExpForm(kappa=-0.5, c0=1.0, c1=-1.0)
        if name == "alpha":
            am1 = float(self.alpha) - 1.0
            return ExpForm(kappa=am1, c0=-1.0 / am1, c1=1.0 / am1)
        return None

    @property
    def limit_at_infinity(self) -> float | None:
        """f′(t → ∞), the value for a sample outside the target's support (P = 0, t = +∞), or None where
        it is +∞ (rkl, rchi2, alpha with α > 1: D_f(π‖p) is infinite once π puts mass where p has none)."""
        name = self.name
        if name == "rkl":
            return None
        if name == "tv":
            return 0.5
        if name == "js":
            return 0.5 * _LOG2
        form = self.exp_form
        return form.c0 if form.kappa < 0 else None


def fprime_spec(divergence) -> FPrimeSpec:
    """A divergence *name* (not ``alpha``, which needs α) or any object with ``kernel_id`` and
    ``alpha_value`` attributes (what ``fdpg_scale.divergences.get_divergence`` returns) -> FPrimeSpec.

    Duck typing keeps this layer free of imports from the math layer above it.
    """
    if isinstance(divergence, FPrimeSpec):
        return divergence
    if isinstance(divergence, str):
        if divergence not in KERNEL_IDS:
            raise ValueError(f"unknown divergence {divergence!r}; valid names: {', '.join(FPRIME_NAMES)}")
        if divergence == "alpha":
            raise ValueError("divergence 'alpha' needs alpha=: pass get_divergence('alpha', alpha=...) "
                             "(alpha → 0 is 'kl', alpha → 1 is 'rkl')")
        return FPrimeSpec(kernel_id=KERNEL_IDS[divergence])
    kernel_id, alpha = getattr(divergence, "kernel_id", None), getattr(divergence, "alpha_value", None)
    if isinstance(kernel_id, bool) or not isinstance(kernel_id, int) or not isinstance(alpha, (int, float)):
        raise TypeError(f"divergence must be a name ({', '.join(FPRIME_NAMES)}) or an object with int kernel_id "
                        f"and float alpha_value (as get_divergence returns), got {type(divergence).__name__}")
    return FPrimeSpec(kernel_id=kernel_id, alpha=float(alpha))


def expm1_over(y: torch.Tensor, c: float) -> torch.Tensor:
    """expm1(y)/c, finite wherever the quotient fits: expm1(y) alone overflows fp32 for y > 88.7 even when
    expm1(y)/c does not (|c| > 1), so for y > 80 it is computed as sign(c)·exp(y − log|c|) − 1/c."""
    big = y > 80.0
    scaled = math.copysign(1.0, c) * torch.exp(torch.where(big, y, torch.zeros_like(y)) - math.log(abs(c))) - 1.0 / c
    return torch.where(big, scaled, torch.expm1(y) / c)


def softplus_exact(x: torch.Tensor) -> torch.Tensor:
    """log(1 + eˣ) = max(x, 0) + log1p(e^−|x|): exact to rounding for every x (torch's softplus returns x
    itself above its threshold 20, an absolute error of up to 2e-9, visible in float64)."""
    return torch.clamp(x, min=0.0) + torch.log1p(torch.exp(-x.abs()))


def f_prime_torch(log_t: torch.Tensor, spec: FPrimeSpec) -> torch.Tensor:
    """f′ as a function of log t (any shape, any float dtype; shape and dtype preserved), per the table above.

    Exact stable forms, no clamp: f′(+inf) is the limit at t → ∞ (+inf where that is infinite) and a NaN
    log t stays NaN.
    """
    name = spec.name
    if name == "kl":
        return -torch.exp(-log_t)
    if name == "rkl":
        return log_t + 1.0
    if name == "tv":
        # torch.sign(nan) is 0: keep a NaN log t NaN instead of turning it into a plausible pseudo-reward.
        return torch.where(torch.isnan(log_t), log_t, 0.5 * torch.sign(log_t))
    if name == "js":
        return 0.5 * (_LOG2 - softplus_exact(-log_t))
    if name == "chi2":
        return -torch.expm1(-2.0 * log_t)
    if name == "rchi2":
        return 2.0 * torch.expm1(log_t)
    if name == "hellinger":
        return -torch.expm1(-0.5 * log_t)
    am1 = float(spec.alpha) - 1.0   # formed in float64 on the host: α ≈ 1 would round away in float32
    return expm1_over(am1 * log_t, am1)
