"""Fused kernels for f-DPG's hot path, installed as ``fdpg_scale.kernels`` (see kernels/README.md).

Public API (kernels/README.md): ``token_logprobs``, ``linear_token_logprobs``, ``fdiv_weights``.
"""

from .fdiv_weights import FDivWeights, fdiv_weights
from .linear_logprobs import linear_token_logprobs
from .token_logprobs import token_logprobs

__all__ = ["token_logprobs", "linear_token_logprobs", "fdiv_weights", "FDivWeights"]
