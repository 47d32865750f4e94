"""Worker for tests/distributed/test_checkpoint.py (one rank).

argv: MODE OUT_DIR MODEL_DIR.
  save: train a step, save checkpoint 1 (records what it saved), train, then start checkpoint 2 with the
        commit replaced (by this test worker, not a flag in the library) by a function that announces itself
        and sleeps: the test SIGKILLs the process while checkpoint 2 sits unfinished in its temp directory.
  load: find the latest checkpoint, load it, record what was loaded.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from fdpg_scale.distributed import checkpoint, engines  # noqa: E402
from fdpg_scale.distributed.launch import init_distributed  # noqa: E402
from tests.distributed.common import batch, ds_config, gathered_state_dict, weighted_loss  # noqa: E402

mode, out_dir, model_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
init_distributed()
policy = engines.build_policy(model_dir, ds_config(1, 4, 1), lr=1e-2)
vocab = policy.module.hf_model.config.vocab_size
fp = {"model": checkpoint.model_config_hash(model_dir), "divergence": "rkl"}


def step(i):
    b = batch(i, vocab, n=4)
    lp = engines.sequence_logprobs(policy, b["input_ids"], b["attention_mask"], b["loss_mask"])
    engines.train_step(policy, weighted_loss(lp, b["weights"]))


if mode == "save":
    step(0)
    checkpoint.save_checkpoint(out_dir / "run", 1, policy=policy, trainer_state={"step": 1, "log_z": 0.25},
                               fingerprint=fp, keep=2)
    torch.save({"params": gathered_state_dict(policy), "rand": torch.rand(2)}, out_dir / "saved.pt")
    step(1)

    def hang(*args, **kwargs):
        (out_dir / "in_commit").write_text("1")
        time.sleep(600)

    checkpoint._commit = hang
    checkpoint.save_checkpoint(out_dir / "run", 2, policy=policy, trainer_state={"step": 2, "log_z": 0.5},
                               fingerprint=fp, keep=2)
elif mode == "load":
    ck = checkpoint.find_latest(out_dir / "run")
    state = checkpoint.load_checkpoint(ck, policy=policy, fingerprint=fp)
    torch.save({"ckpt": str(ck), "state": state, "params": gathered_state_dict(policy),
                "rand": torch.rand(2)}, out_dir / "loaded.pt")
