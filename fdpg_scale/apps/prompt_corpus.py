"""``fdpg-scale prompts``: contexts for conditional tasks, taken from the corpus the base model never saw.

Each prompt is a one-line function signature (``def name(args):``) from the *held-out* documents of the
standard-library corpus (the same split as ``pretrain-base``), so the conditional target P(x|c) asks for a
continuation of code the base model was not trained on. Deterministic: documents in path order, signatures
in file order, duplicates dropped, the first ``--n`` kept.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from fdpg_scale.models.base_config import PretrainConfig
from fdpg_scale.models.corpus import collect_documents, split_documents

__all__ = ["signature_prompts", "run"]

_SIGNATURE = re.compile(r"^def [A-Za-z_]\w*\(.*\):[ \t]*$")


def signature_prompts(corpus: str | Path | None, n: int) -> list[str]:
    """Up to ``n`` distinct top-level ``def ...:`` lines (with their newline) from the held-out documents."""
    _, heldout = split_documents(collect_documents(corpus), PretrainConfig().heldout_fraction)
    prompts: list[str] = []
    for doc in heldout:
        for line in doc.text.splitlines():
            if _SIGNATURE.match(line) and line + "\n" not in prompts:
                prompts.append(line + "\n")
                if len(prompts) == n:
                    return prompts
    return prompts


def run(args) -> int:
    """``fdpg-scale prompts [--out FILE] [--n N] [--corpus DIR]`` (arguments parsed by ``fdpg_scale.apps.cli``)."""
    prompts = signature_prompts(args.corpus, args.n)
    if not prompts:
        print(f"fdpg-scale prompts: no function signature found in the held-out documents of "
              f"{args.corpus or 'the standard library'}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    tmp.replace(args.out)
    print(f"wrote {len(prompts)} prompts to {args.out}")
    return 0
