"""An enumerable autoregressive toy LM: every sequence can be listed, so every quantity has an exact value.

Vocabulary: K ordinary tokens ``0 … K−1`` plus ``EOS = K`` (V = K + 1 ids). A sequence is a string of n ≤ L
ordinary tokens; it is stored as a row of L token ids: the n tokens, then EOS if n < L (the model *chose* to
stop), then EOS padding. A string of L ordinary tokens has no EOS (generation stops at ``max_len``, as with
``max_new_tokens``). So a row makes min(n + 1, L) decisions, and

    π(x) = Π_{t < n} π(x_t | x_<t) · [n < L] π(EOS | x_<n),        N = Σ_{n=0}^{L} K^n sequences.

Tabular policy: one free logit vector [V] per prefix that still has a decision to make (the M = Σ_{n<L} K^n
prefixes of length < L), so the model can represent *any* distribution over the N sequences with full
support, hence any full-support target exactly. Prefixes and sequences share one index: a token string
s of length n has index ``offset(n) + code(s)``, offset(n) = Σ_{m<n} K^m, code(s) = s read in base K; for n < L
the same number is the row of its logit table and its position in ``all_sequences()``.

Everything runs in the module's dtype (float64 by default, for the exact proofs) and is vectorised over
sequences; the only Python loops run over the L positions.

Exact helpers (all log space, differentiable where the gradient is finite): ``exact_log_z``, ``normalise``,
``exact_divergence`` (D_f(π‖p) = Σ_x p(x) f(π(x)/p(x))), ``exact_kl`` (KL(p‖π)).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fdpg_scale.core.divergences import Divergence, get_divergence
from fdpg_scale.core.sequences import first_eos_mask

__all__ = ["ToyLM", "exact_log_z", "normalise", "exact_divergence", "exact_kl"]


class ToyLM(nn.Module):
    """Tabular autoregressive LM over ``vocab_size`` tokens + EOS, sequences of at most ``max_len`` tokens.

    Args:
        vocab_size: K ≥ 1, the ordinary tokens (EOS = K is added).
        max_len: L ≥ 1, the most tokens a sequence holds (EOS counted when present).
        init_scale: logits start as init_scale · N(0, 1) (0 → every next-token distribution uniform).
        generator: torch.Generator for the initial logits (None: the global RNG).
        dtype: parameter dtype (float64 default: the exact proofs need it).

    The only parameter is ``logits`` [M, V], M = Σ_{n<L} K^n (one row per prefix of length < L).
    """

    def __init__(self, vocab_size: int, max_len: int, *, init_scale: float = 1.0,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64):
        super().__init__()
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an int ≥ 1, got {vocab_size!r}")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be an int ≥ 1, got {max_len!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.eos = vocab_size
        # offsets[n] = Σ_{m<n} K^m, n = 0 … L+1 (offsets[L+1] = N).
        powers = [vocab_size ** n for n in range(max_len + 1)]
        offsets = [0]
        for p in powers:
            offsets.append(offsets[-1] + p)
        self.register_buffer("_offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.num_prefixes = offsets[max_len]
        self.num_sequences = offsets[max_len + 1]
        init = torch.randn(self.num_prefixes, vocab_size + 1, generator=generator, dtype=dtype)
        self.logits = nn.Parameter(init_scale * init)

    # ------------------------------------------------------------------------------------ structure
    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size} (+EOS={self.eos}), max_len={self.max_len}, "
                f"sequences={self.num_sequences}, prefixes={self.num_prefixes}")

    def _check_seqs(self, seqs: torch.Tensor) -> None:
        if not isinstance(seqs, torch.Tensor) or seqs.dtype != torch.long:
            raise TypeError(f"seqs must be a LongTensor [N, L={self.max_len}], got "
                            f"{getattr(seqs, 'dtype', type(seqs).__name__)}")
        if seqs.dim() != 2 or seqs.shape[1] != self.max_len:
            raise ValueError(f"seqs must be [N, L={self.max_len}], got shape {list(seqs.shape)}")
        if seqs.numel() and (int(seqs.min()) < 0 or int(seqs.max()) > self.eos):
            raise ValueError(f"seqs holds ids outside 0 … {self.eos} (EOS = {self.eos})")

    def mask(self, seqs: torch.Tensor) -> torch.Tensor:
        """seqs [N, L] -> bool [N, L]: the positions that are decisions (tokens up to and including the first EOS)."""
        self._check_seqs(seqs)
        return first_eos_mask(seqs, self.eos)

    def lengths(self, seqs: torch.Tensor) -> torch.Tensor:
        """seqs [N, L] -> long [N]: n, the number of ordinary tokens (before the first EOS)."""
        self._check_seqs(seqs)
        return ((seqs != self.eos).long().cumprod(dim=1)).sum(dim=1)

    def _codes(self, seqs: torch.Tensor) -> torch.Tensor:
        """[N, L] -> long [N, L+1]: index of the prefix x_<t for t = 0 … L (the last is the whole string)."""
        n_rows = seqs.shape[0]
        idx = torch.zeros(n_rows, self.max_len + 1, dtype=torch.long, device=seqs.device)
        code = torch.zeros(n_rows, dtype=torch.long, device=seqs.device)
        # Past the first EOS the prefix stops growing; clamp keeps padded positions pointing at valid rows.
        alive = torch.ones(n_rows, dtype=torch.bool, device=seqs.device)
        length = torch.zeros(n_rows, dtype=torch.long, device=seqs.device)
        for t in range(self.max_len):
            tok = seqs[:, t]
            alive = alive & (tok != self.eos)
            code = torch.where(alive, code * self.vocab_size + tok.clamp(max=self.vocab_size - 1), code)
            length = length + alive.long()
            idx[:, t + 1] = self._offsets[length] + code
        return idx

    def sequence_index(self, seqs: torch.Tensor) -> torch.Tensor:
        """seqs [N, L] -> long [N]: each sequence's row in ``all_sequences()`` (to look up exact tables)."""
        self._check_seqs(seqs)
        return self._codes(seqs)[:, -1]

    def all_sequences(self) -> torch.Tensor:
        """LongTensor [N, L]: every sequence once, row i the one with ``sequence_index`` i (by length, then base K)."""
        rows = []
        k, L = self.vocab_size, self.max_len
        for n in range(L + 1):
            count = k ** n
            code = torch.arange(count, dtype=torch.long)
            seq = torch.full((count, L), self.eos, dtype=torch.long)
            for t in range(n):  # digit t (most significant first) of code in base K
                seq[:, t] = (code // k ** (n - 1 - t)) % k
            rows.append(seq)
        return torch.cat(rows).to(self.logits.device)

    # ---------------------------------------------------------------------------------- probabilities
    def token_logprobs(self, seqs: torch.Tensor) -> torch.Tensor:
        """seqs [N, L] -> [N, L] log π(x_t | x_<t) at decision positions, exactly 0 elsewhere (differentiable)."""
        self._check_seqs(seqs)
        mask = self.mask(seqs)
        prefix = self._codes(seqs)[:, :-1]                           # [N, L]: row of x_<t
        logp = torch.log_softmax(self.logits, dim=-1)                # [M, V]
        tok = logp[prefix, seqs]                                    # [N, L]
        return torch.where(mask, tok, torch.zeros((), dtype=tok.dtype, device=tok.device))

    def log_prob(self, seqs: torch.Tensor) -> torch.Tensor:
        """seqs [N, L] -> [N] log π(x) = Σ_t log π(x_t | x_<t) (differentiable w.r.t. ``logits``)."""
        return self.token_logprobs(seqs).sum(dim=1)

    def log_prob_all(self) -> torch.Tensor:
        """[N] log π over ``all_sequences()`` (sums to 1 in probability; differentiable)."""
        return self.log_prob(self.all_sequences())

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n i.i.d. sequences from π, token by token: LongTensor [n, L] (EOS-padded)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int ≥ 0, got {n!r}")
        seqs = torch.full((n, self.max_len), self.eos, dtype=torch.long, device=self.logits.device)
        probs = torch.softmax(self.logits, dim=-1)
        row = torch.zeros(n, dtype=torch.long, device=self.logits.device)   # prefix index; offset(0)+0 = 0
        alive = torch.ones(n, dtype=torch.bool, device=self.logits.device)
        for t in range(self.max_len):
            if n == 0:
                break
            tok = torch.multinomial(probs[row], 1, generator=generator).squeeze(1)
            tok = torch.where(alive, tok, torch.full_like(tok, self.eos))
            seqs[:, t] = tok
            alive = alive & (tok != self.eos)
            if t + 1 < self.max_len:
                # child of prefix (length t, code c) by token k: offset(t+1) + c·K + k
                code = row - self._offsets[t]
                row = torch.where(alive, self._offsets[t + 1] + code * self.vocab_size + tok, row)
        return seqs

    @torch.no_grad()
    def set_distribution_(self, log_p_all: torch.Tensor) -> "ToyLM":
        """Set the logits so that π = p exactly, from [N] normalised log p over ``all_sequences()``; returns self.

        The tabular model can represent any distribution: with M(s) = Σ_{x extends s} p(x) the mass of
        prefix s, logit[s, k] = log M(s·k) and logit[s, EOS] = log p(s), so the softmax gives
        π(k | s) = M(s·k)/M(s). Prefixes of zero mass get uniform logits (never reached). −inf allowed.
        """
        if log_p_all.shape != (self.num_sequences,):
            raise ValueError(f"log_p_all must be [N] = [{self.num_sequences}], got shape {list(log_p_all.shape)}")
        seqs = self.all_sequences()
        codes = self._codes(seqs)                                          # [N, L+1]
        lengths = self.lengths(seqs)
        real = torch.arange(self.max_len + 1, device=seqs.device)[None, :] <= lengths[:, None]
        # log M over all N strings: logsumexp over (sequence, prefix length) pairs with that prefix.
        lp = log_p_all.to(self.logits.dtype).to(seqs.device)[:, None].expand_as(codes)
        mass_max = torch.full((self.num_sequences,), -torch.inf, dtype=lp.dtype, device=lp.device)
        mass_max = mass_max.scatter_reduce(0, codes[real], lp[real], "amax", include_self=True)
        shift = torch.where(torch.isfinite(mass_max), mass_max, torch.zeros_like(mass_max))
        mass = torch.zeros_like(mass_max).index_add_(0, codes[real], torch.exp(lp[real] - shift[codes[real]]))
        log_mass = torch.log(mass) + shift                                 # [N], indexed like the sequences
        prefix = torch.arange(self.num_prefixes, device=seqs.device)
        length = torch.bucketize(prefix, self._offsets, right=True) - 1    # n of each prefix
        code = prefix - self._offsets[length]
        child = self._offsets[length + 1][:, None] + code[:, None] * self.vocab_size + torch.arange(
            self.vocab_size, device=seqs.device)[None, :]                  # [M, K]
        logits = torch.cat([log_mass[child], log_p_all.to(lp.dtype)[prefix][:, None]], dim=1)
        dead = torch.isneginf(logits).all(dim=1, keepdim=True)
        self.logits.copy_(torch.where(dead, torch.zeros_like(logits), logits))
        return self

    # ---------------------------------------------------------------------------------------- copies
    def clone(self) -> "ToyLM":
        """An independent copy (same logits, own storage, no shared autograd history)."""
        other = copy.deepcopy(self)
        other.logits.grad = None
        return other

    @torch.no_grad()
    def copy_(self, other: "ToyLM") -> "ToyLM":
        """Overwrite this model's logits with ``other``'s (shapes must match); returns self."""
        if not isinstance(other, ToyLM) or other.logits.shape != self.logits.shape:
            raise ValueError(f"copy_ needs a ToyLM with logits {list(self.logits.shape)}, got "
                             f"{list(getattr(getattr(other, 'logits', None), 'shape', [])) or type(other).__name__}")
        self.logits.copy_(other.logits)
        return self


# ---------------------------------------------------------------------------------------- exact helpers
def exact_log_z(log_target_all: torch.Tensor) -> torch.Tensor:
    """[N] log P over every sequence (−inf allowed) -> 0-d log Z = log Σ_x P(x)."""
    if log_target_all.dim() != 1:
        raise ValueError(f"log_target_all must be [N], got shape {list(log_target_all.shape)}")
    return torch.logsumexp(log_target_all, dim=0)


def normalise(log_target_all: torch.Tensor) -> torch.Tensor:
    """[N] log P -> [N] log p = log P − log Z."""
    return log_target_all - exact_log_z(log_target_all)


def exact_divergence(divergence: str | Divergence, log_pi_all: torch.Tensor, log_p_all: torch.Tensor) -> torch.Tensor:
    """D_f(π‖p) = Σ_x p(x) f(π(x)/p(x)) over every sequence, from [N] log π and [N] *normalised* log p.

    Where p(x) = 0 < π(x) the term is its limit lim_{p→0} p·f(π/p) = π(x)·f′(∞) (finite for tv, js,
    hellinger, chi2, kl (0), alpha < 1; +inf for rkl, rchi2, alpha > 1), so the value is exact on pointwise
    targets too. Differentiable w.r.t. log π wherever the result is finite (boolean selection, no
    where-with-inf, so no NaN gradients). Returns a 0-d tensor in the inputs' dtype.
    """
    d = get_divergence(divergence)
    if log_pi_all.shape != log_p_all.shape or log_pi_all.dim() != 1:
        raise ValueError(f"log_pi_all and log_p_all must both be [N], got shapes {list(log_pi_all.shape)} "
                         f"and {list(log_p_all.shape)}")
    log_mass = float(torch.logsumexp(log_p_all.detach(), 0))
    if not abs(log_mass) <= (1e-9 if log_p_all.dtype == torch.float64 else 1e-4):
        raise ValueError(f"log_p_all must be normalised (log Σ p = 0), got log Σ p = {log_mass:.3g}: "
                         f"pass normalise(log_target_all)")
    on_p = log_p_all > -torch.inf
    total = (torch.exp(log_p_all[on_p]) * d.f(log_pi_all[on_p] - log_p_all[on_p])).sum()
    off = ~on_p & (log_pi_all > -torch.inf)
    if bool(off.any()):
        f_prime_inf = d.f_prime(torch.tensor(torch.inf, dtype=log_pi_all.dtype, device=log_pi_all.device))
        if f_prime_inf != 0:
            total = total + (torch.exp(log_pi_all[off]) * f_prime_inf).sum()
    return total


def exact_kl(log_pi_all: torch.Tensor, log_p_all: torch.Tensor) -> torch.Tensor:
    """KL(p‖π) = Σ_x p log(p/π) from [N] log π and [N] normalised log p (the convergence metric)."""
    return exact_divergence("kl", log_pi_all, log_p_all)
