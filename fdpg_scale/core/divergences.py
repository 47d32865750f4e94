"""f-divergences written in log space, as f-DPG needs them.

Convention (docs/method.md §2): ``D_f(π‖p) = E_p[f(t)]`` with ``t = π(x)/p(x)``, ``f`` convex and ``f(1) = 0``.
Textbook scaling throughout (not disco's 2× variants). The f-DPG gradient only ever needs ``f′(t)``
(Theorem 1: ``∇D_f = E_π[f′(π/p) ∇log π]``), so a divergence here *is* its ``f′``; ``f`` is kept for
exact evaluation on enumerable problems and for the importance-sampled metrics.

Both methods take ``log_t`` (any shape, any float dtype) and never exponentiate more than the formula asks
for: ratios of sequence probabilities routinely reach e^±50, where ``t`` itself is not representable in
fp16/bf16 and ``t²`` is not representable in fp32. Every formula is finite wherever its true value fits the
dtype, with no clamp on log t; at log t = +inf (a sample outside the target's support) ``f_prime`` is the
limit of f′ at t → ∞ (+inf for rkl, rchi2 and alpha with α > 1).

f′ and the kernel ids are owned by the kernels (``fdpg_scale.kernels.f_prime``: the Triton kernel switches
on the id, the torch forms there are its reference); each class here takes its ``kernel_id`` and ``f_prime``
from that table, and adds ``f`` for exact evaluation. The divergence is stateless.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from fdpg_scale.kernels.f_prime import KERNEL_IDS, FPrimeSpec, expm1_over, f_prime_torch, softplus_exact

__all__ = ["Divergence", "get_divergence", "DIVERGENCE_NAMES"]

_LOG2 = math.log(2.0)


@dataclass(frozen=True)
class Divergence:
    """Base class: ``f(log_t)`` and ``f_prime(log_t)`` elementwise, shapes preserved."""

    name: ClassVar[str] = ""
    # Index of this divergence in the kernels' f′ table (fdpg_scale.kernels.f_prime.KERNEL_IDS).
    kernel_id: ClassVar[int] = -1
    # E_π[r] = E_π[−f′(π/p)] where it is the same number for every π (the trainer's baseline then needs no
    # estimate: docs/method.md §4); None where it depends on π.
    exact_baseline: ClassVar[float | None] = None

    @property
    def alpha_value(self) -> float:
        """The α the kernel receives (0.0 for every divergence but ``alpha``)."""
        return 0.0

    @property
    def fprime_spec(self) -> FPrimeSpec:
        """What the kernels need to evaluate this f′: its id and α."""
        return FPrimeSpec(kernel_id=self.kernel_id, alpha=self.alpha_value)

    def f(self, log_t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def f_prime(self, log_t: torch.Tensor) -> torch.Tensor:
        """f′(t) given log t, elementwise (the kernels' torch form, exact and unclamped)."""
        return f_prime_torch(log_t, self.fprime_spec)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class ForwardKL(Divergence):
    """KL(p‖π). f(t) = −log t, f′(t) = −1/t.

    f′ = −exp(−log t) is unbounded where π ≪ p: the method's known variance problem. It is not clipped
    here; clipping is the explicit ``clip=`` option of ``fdiv_weights``.
    """

    name: ClassVar[str] = "kl"
    kernel_id: ClassVar[int] = KERNEL_IDS["kl"]
    # r = −f′(t) = p/π, so E_π[r] = Σ_{x: p>0} π·p/π = Σ_x p(x) = 1 for every π.
    exact_baseline: ClassVar[float | None] = 1.0

    def f(self, log_t):
        return -log_t


@dataclass(frozen=True)
class ReverseKL(Divergence):
    """KL(π‖p). f(t) = t log t, f′(t) = log t + 1 (reverse-KL f-DPG is KL-penalised RL)."""

    name: ClassVar[str] = "rkl"
    kernel_id: ClassVar[int] = KERNEL_IDS["rkl"]

    def f(self, log_t):
        # t·log t → 0 as log t → −∞; torch gives 0·(−inf) = nan there, so guard it.
        return torch.where(torch.isneginf(log_t), torch.zeros_like(log_t), torch.exp(log_t) * log_t)


@dataclass(frozen=True)
class TotalVariation(Divergence):
    """TV(π, p). f(t) = ½|t − 1|, f′(t) = ½ sign(t − 1)."""

    name: ClassVar[str] = "tv"
    kernel_id: ClassVar[int] = KERNEL_IDS["tv"]

    def f(self, log_t):
        return 0.5 * torch.abs(torch.expm1(log_t))


@dataclass(frozen=True)
class JensenShannon(Divergence):
    """JS(π, p) = ½KL(π‖m) + ½KL(p‖m), m = (π+p)/2.

    f(t) = ½[t log(2t/(1+t)) + log(2/(1+t))], f′(t) = ½ log(2t/(1+t)).
    In log space: log(2t/(1+t)) = log 2 − softplus(−log t), log(2/(1+t)) = log 2 − softplus(log t).
    """

    name: ClassVar[str] = "js"
    kernel_id: ClassVar[int] = KERNEL_IDS["js"]

    def f(self, log_t):
        first = torch.exp(log_t) * (_LOG2 - softplus_exact(-log_t))
        first = torch.where(torch.isneginf(log_t), torch.zeros_like(first), first)
        return 0.5 * (first + _LOG2 - softplus_exact(log_t))


@dataclass(frozen=True)
class ChiSquared(Divergence):
    """χ²(p‖π) = Σ (p − π)²/π. f(t) = (1 − t)²/t, f′(t) = 1 − 1/t².

    (1 − t)²/t = t − 2 + 1/t = 4 sinh²(log t / 2): no t² is formed (finite in fp32 up to |log t| ≈ 89).
    """

    name: ClassVar[str] = "chi2"
    kernel_id: ClassVar[int] = KERNEL_IDS["chi2"]

    def f(self, log_t):
        return 4.0 * torch.sinh(0.5 * log_t) ** 2


@dataclass(frozen=True)
class ReverseChiSquared(Divergence):
    """χ²(π‖p) = Σ (π − p)²/p. f(t) = (t − 1)², f′(t) = 2(t − 1)."""

    name: ClassVar[str] = "rchi2"
    kernel_id: ClassVar[int] = KERNEL_IDS["rchi2"]

    def f(self, log_t):
        return torch.expm1(log_t) ** 2


@dataclass(frozen=True)
class Hellinger(Divergence):
    """Squared Hellinger. f(t) = (√t − 1)², f′(t) = 1 − 1/√t."""

    name: ClassVar[str] = "hellinger"
    kernel_id: ClassVar[int] = KERNEL_IDS["hellinger"]

    def f(self, log_t):
        return torch.expm1(0.5 * log_t) ** 2


@dataclass(frozen=True)
class AlphaDivergence(Divergence):
    """Amari α-divergence, α ∉ {0, 1} (α → 0 is ``kl``, α → 1 is ``rkl``).

    f(t) = (t^α − αt − (1 − α)) / (α(α − 1)) = (expm1(α log t) − α expm1(log t)) / (α(α − 1)),
    f′(t) = (t^(α−1) − 1)/(α − 1) = expm1((α − 1) log t)/(α − 1). The expm1 forms keep precision at t ≈ 1.
    """

    alpha: float
    name: ClassVar[str] = "alpha"
    kernel_id: ClassVar[int] = KERNEL_IDS["alpha"]

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

    def f(self, log_t):
        a = self.alpha
        return expm1_over(a * log_t, a * (a - 1.0)) - expm1_over(log_t, a - 1.0)

    def __str__(self) -> str:
        return f"alpha({self.alpha:g})"


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
