"""f-divergences written in log space, as f-DPG needs them.

Convention (DESIGN.md §1): ``D_f(π‖p) = E_p[f(t)]`` with ``t = π(x)/p(x)``, ``f`` convex and ``f(1) = 0``.
Textbook scaling throughout (not disco's 2× variants). The f-DPG gradient only ever needs ``f′(t)``
(Theorem 1: ``∇D_f = E_π[f′(π/p) ∇log π]``), so a divergence here *is* its ``f′``; ``f`` is kept for
exact evaluation on enumerable problems and for the importance-sampled metrics.

Both methods take ``log_t`` (any shape, any float dtype) and never exponentiate more than the formula asks
for: ratios of sequence probabilities routinely reach e^±50, where ``t`` itself is not representable in
fp16/bf16 and ``t²`` is not representable in fp32. Every formula is finite in float32 for
``log_t ∈ [−80, 80]`` wherever its true value fits in float32.

The divergence is stateless; ``kernel_id``/``alpha`` let the Triton ``fdiv_weights`` kernel pick the same
formula as a compile-time constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

__all__ = ["Divergence", "get_divergence", "DIVERGENCE_NAMES"]

_LOG2 = math.log(2.0)


@dataclass(frozen=True)
class Divergence:
    """Base class: ``f(log_t)`` and ``f_prime(log_t)`` elementwise, shapes preserved."""

    name: ClassVar[str] = ""
    # Index of this divergence in the Triton kernel's constexpr switch (kernels/fdiv_weights.py).
    kernel_id: ClassVar[int] = -1

    @property
    def alpha_value(self) -> float:
        """The α the kernel receives (0.0 for every divergence but ``alpha``)."""
        return 0.0

    @property
    def exp_rate(self) -> float:
        """κ: f′(log t) grows like e^{κ·log t} at worst (kl: −1, rkl: 0, chi2: −2, ...). ``fdiv_weights`` bounds
        |log t| by 80 / max(1, |κ|) so that f′ stays finite in float32 at the bound."""
        return 1.0

    def f(self, log_t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def f_prime(self, log_t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class ForwardKL(Divergence):
    """KL(p‖π). f(t) = −log t, f′(t) = −1/t.

    f′ = −exp(−log t) is unbounded where π ≪ p: the method's known variance problem. It is not clipped
    here; clipping is the explicit ``clip=`` option of ``fdiv_weights``.
    """

    name: ClassVar[str] = "kl"
    kernel_id: ClassVar[int] = 0

    @property
    def exp_rate(self) -> float:
        return -1.0

    def f(self, log_t):
        return -log_t

    def f_prime(self, log_t):
        return -torch.exp(-log_t)


@dataclass(frozen=True)
class ReverseKL(Divergence):
    """KL(π‖p). f(t) = t log t, f′(t) = log t + 1 (reverse-KL f-DPG is KL-penalised RL)."""

    name: ClassVar[str] = "rkl"
    kernel_id: ClassVar[int] = 1

    @property
    def exp_rate(self) -> float:
        return 0.0

    def f(self, log_t):
        # t·log t → 0 as log t → −∞; torch gives 0·(−inf) = nan there, so guard it.
        return torch.where(torch.isneginf(log_t), torch.zeros_like(log_t), torch.exp(log_t) * log_t)

    def f_prime(self, log_t):
        return log_t + 1.0


@dataclass(frozen=True)
class TotalVariation(Divergence):
    """TV(π, p). f(t) = ½|t − 1|, f′(t) = ½ sign(t − 1)."""

    name: ClassVar[str] = "tv"
    kernel_id: ClassVar[int] = 2

    @property
    def exp_rate(self) -> float:
        return 0.0

    def f(self, log_t):
        return 0.5 * torch.abs(torch.expm1(log_t))

    def f_prime(self, log_t):
        # torch.sign(nan) is 0: keep a NaN log t NaN instead of turning it into a plausible pseudo-reward.
        return torch.where(torch.isnan(log_t), log_t, 0.5 * torch.sign(log_t))


@dataclass(frozen=True)
class JensenShannon(Divergence):
    """JS(π, p) = ½KL(π‖m) + ½KL(p‖m), m = (π+p)/2.

    f(t) = ½[t log(2t/(1+t)) + log(2/(1+t))], f′(t) = ½ log(2t/(1+t)).
    In log space: log(2t/(1+t)) = log 2 − softplus(−log t), log(2/(1+t)) = log 2 − softplus(log t).
    """

    name: ClassVar[str] = "js"
    kernel_id: ClassVar[int] = 3

    @property
    def exp_rate(self) -> float:
        return 0.0

    def f(self, log_t):
        first = torch.exp(log_t) * (_LOG2 - F.softplus(-log_t))
        first = torch.where(torch.isneginf(log_t), torch.zeros_like(first), first)
        return 0.5 * (first + _LOG2 - F.softplus(log_t))

    def f_prime(self, log_t):
        return 0.5 * (_LOG2 - F.softplus(-log_t))


@dataclass(frozen=True)
class ChiSquared(Divergence):
    """χ²(p‖π) = Σ (p − π)²/π. f(t) = (1 − t)²/t, f′(t) = 1 − 1/t².

    (1 − t)²/t = t − 2 + 1/t = 4 sinh²(log t / 2): no t² is formed, so it stays finite in fp32 at |log t| = 80.
    """

    name: ClassVar[str] = "chi2"
    kernel_id: ClassVar[int] = 4

    @property
    def exp_rate(self) -> float:
        return -2.0

    def f(self, log_t):
        return 4.0 * torch.sinh(0.5 * log_t) ** 2

    def f_prime(self, log_t):
        return -torch.expm1(-2.0 * log_t)


@dataclass(frozen=True)
class ReverseChiSquared(Divergence):
    """χ²(π‖p) = Σ (π − p)²/p. f(t) = (t − 1)², f′(t) = 2(t − 1)."""

    name: ClassVar[str] = "rchi2"
    kernel_id: ClassVar[int] = 5

    @property
    def exp_rate(self) -> float:
        return 1.0

    def f(self, log_t):
        return torch.expm1(log_t) ** 2

    def f_prime(self, log_t):
        return 2.0 * torch.expm1(log_t)


@dataclass(frozen=True)
class Hellinger(Divergence):
    """Squared Hellinger. f(t) = (√t − 1)², f′(t) = 1 − 1/√t."""

    name: ClassVar[str] = "hellinger"
    kernel_id: ClassVar[int] = 6

    @property
    def exp_rate(self) -> float:
        return -0.5

    def f(self, log_t):
        return torch.expm1(0.5 * log_t) ** 2

    def f_prime(self, log_t):
        return -torch.expm1(-0.5 * log_t)


@dataclass(frozen=True)
class AlphaDivergence(Divergence):
    """Amari α-divergence, α ∉ {0, 1} (α → 0 is ``kl``, α → 1 is ``rkl``).

    f(t) = (t^α − αt − (1 − α)) / (α(α − 1)) = (expm1(α log t) − α expm1(log t)) / (α(α − 1)),
    f′(t) = (t^(α−1) − 1)/(α − 1) = expm1((α − 1) log t)/(α − 1). The expm1 forms keep precision at t ≈ 1.
    """

    alpha: float
    name: ClassVar[str] = "alpha"
    kernel_id: ClassVar[int] = 7

    def __post_init__(self):
        a = float(self.alpha)
        if not math.isfinite(a):
            raise ValueError(f"divergence 'alpha' needs a finite alpha, got {self.alpha!r}")
        if a == 0.0:
            raise ValueError("divergence 'alpha' with alpha=0 is the limit forward KL: use divergence 'kl'")
        if a == 1.0:
            raise ValueError("divergence 'alpha' with alpha=1 is the limit reverse KL: use divergence 'rkl'")

    @property
    def alpha_value(self) -> float:
        return float(self.alpha)

    @property
    def exp_rate(self) -> float:
        return float(self.alpha) - 1.0

    def f(self, log_t):
        a = self.alpha
        return _expm1_over(a * log_t, a * (a - 1.0)) - _expm1_over(log_t, a - 1.0)

    def f_prime(self, log_t):
        a = self.alpha
        return _expm1_over((a - 1.0) * log_t, a - 1.0)

    def __str__(self) -> str:
        return f"alpha({self.alpha:g})"


def _expm1_over(y: torch.Tensor, c: float) -> torch.Tensor:
    """expm1(y)/c, finite wherever the quotient fits: expm1(y) alone overflows fp32 for y > 88.7 even when
    expm1(y)/c does not, so for y > 80 it is computed as sign(c)·exp(y − log|c|) − 1/c."""
    big = y > 80.0
    scaled = math.copysign(1.0, c) * torch.exp(torch.where(big, y, torch.zeros_like(y)) - math.log(abs(c))) - 1.0 / c
    return torch.where(big, scaled, torch.expm1(y) / c)


_REGISTRY: dict[str, type[Divergence]] = {
    cls.name: cls
    for cls in (ForwardKL, ReverseKL, TotalVariation, JensenShannon, ChiSquared, ReverseChiSquared, Hellinger,
                AlphaDivergence)
}
DIVERGENCE_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_divergence(name: str | Divergence, *, alpha: float | None = None) -> Divergence:
    """The divergence called ``name`` (one of ``DIVERGENCE_NAMES``); ``alpha=`` only for ``"alpha"``.

    A ``Divergence`` passed in is returned as it is, so APIs can take either a name or the object.

    >>> get_divergence("js").f_prime(torch.zeros(3))        # f′(1) = ½ log 1 = 0
    tensor([0., 0., 0.])
    """
    if isinstance(name, Divergence):
        return name
    if name not in _REGISTRY:
        raise ValueError(f"unknown divergence {name!r}; valid names: {', '.join(DIVERGENCE_NAMES)}")
    if name == "alpha":
        if alpha is None:
            raise ValueError("divergence 'alpha' needs alpha= (alpha → 0 is 'kl', alpha → 1 is 'rkl')")
        return AlphaDivergence(alpha=alpha)
    if alpha is not None:
        raise ValueError(f"divergence {name!r} takes no alpha (only 'alpha' does); got alpha={alpha}")
    return _REGISTRY[name]()
