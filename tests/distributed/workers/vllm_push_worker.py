"""Worker for tests/distributed/test_vllm_push.py: one vLLM engine, one grouped push, Σw² read back.

Runs under ``main()`` (vLLM spawns its engine process, which re-imports this file). argv: OUT_DIR MODEL_DIR
LIMIT_BYTES. Writes OUT_DIR/results.json.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from fdpg_scale.distributed.vllm_engine import VllmEngineSettings, VllmProposal  # noqa: E402

SCALE = 1.5


def main():
    out_dir, model_dir, limit = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir)
    engine = VllmProposal(model_dir, VllmEngineSettings(kv_cache_bytes=64 * 2**20), seed=0)
    before = engine.llm.collective_rpc("fdpg_square_sums")[0]
    # every tensor (the tied head under its own name too), scaled so that a tensor the push missed shows
    named = [(name, p.detach() * SCALE) for name, p in hf.named_parameters(remove_duplicate=False)]
    seconds = engine.load_weights(iter(named), version="scaled", limit_bytes=limit)
    after = engine.llm.collective_rpc("fdpg_square_sums")[0]
    res = {"before": before, "after": after, "groups": engine.last_push_groups, "seconds": seconds,
           "sent_bytes": sum(t.numel() * 4 for _, t in named), "names": [n for n, _ in named]}
    engine.close()
    (out_dir / "results.json").write_text(json.dumps(res))


if __name__ == "__main__":
    main()
