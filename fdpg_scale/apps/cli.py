"""The ``fdpg-scale`` command line: parse, then hand over to the module that does the job.

    fdpg-scale train --config FILE [key=value ...]     f-DPG training (torchrun / deepspeed launcher / SLURM)
    fdpg-scale export OUTPUT_DIR --to HF_DIR           latest checkpoint's policy → Hugging Face directory
    fdpg-scale eval OUTPUT_DIR                         alignment, KL(p‖π), KL(π‖a), diversity of the latest policy
    fdpg-scale sweep --configs A.yaml [B.yaml] [--divergences kl rkl js]   runs + report.md with plots
    fdpg-scale demo                                    pretrain-base, then a sweep of configs/demo.yaml on 2 ranks
    fdpg-scale pretrain-base                           the demo's base model, trained on the stdlib (cached)
    fdpg-scale plan --config FILE --nodes N --gpus-per-node G   per-GPU memory plan
    fdpg-scale toy [--divergences kl rkl ...]          f-DPG on an enumerable toy, exact divergences per step

Each job module is imported only when its command runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from fdpg_scale.errors import EXIT_BAD_INPUT, EXIT_NONFINITE, CheckpointError, ConfigError, NonFiniteError

__all__ = ["main"]


def _train(args: argparse.Namespace) -> int:
    from fdpg_scale.training.config import load_config
    from fdpg_scale.training.loop import train

    cfg = load_config(args.config, args.overrides)
    train(cfg)
    return 0


def _export(args: argparse.Namespace) -> int:
    from fdpg_scale.distributed.export import export_latest

    path = export_latest(args.output_dir, args.to)
    print(f"exported the policy of {path} to {args.to}")
    return 0


# Commands whose arguments (``--help`` included) belong to another module's own ``main(argv) -> int``:
# name -> (module, one-line help for `fdpg-scale --help`). Imported only when run.
_DELEGATED = {
    "demo": ("fdpg_scale.apps.demo", "the embedded default: pretrain the base, f-DPG with kl/rkl/js on 2 ranks, report with plots"),
    "pretrain-base": ("fdpg_scale.apps.pretrain", "train the base model (BPE tokenizer + small GPT-2) on the Python standard "
                                  "library, cached"),
    "eval": ("fdpg_scale.apps.evaluate", "evaluate a run's latest policy against its target and base model"),
    "sweep": ("fdpg_scale.apps.sweep", "train and evaluate configs × divergences, write report.md with plots"),
    "plan": ("fdpg_scale.apps.plan", "per-GPU memory plan of a config on N nodes × G GPUs"),
    "prompts": ("fdpg_scale.apps.prompt_corpus", "write conditional-task prompts (function signatures) from the held-out stdlib "
                                 "corpus"),
    "toy": ("fdpg_scale.apps.toy", "f-DPG on an enumerable toy model, exact divergences per step"),
}


def _run_delegated(name: str, argv: list[str]) -> int:
    module = importlib.import_module(_DELEGATED[name][0])
    return module.main(argv) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fdpg-scale", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Align a language model to a target distribution by f-divergence minimisation (f-DPG), "
                    "with DeepSpeed ZeRO-3.",
        epilog="examples:\n  fdpg-scale train --config configs/smoke.yaml train.steps=20 divergence.name=rkl\n"
               "  torchrun --standalone --nproc_per_node 2 -m fdpg_scale.cli train --config configs/smoke.yaml\n"
               "  fdpg-scale export runs/smoke --to runs/smoke-hf\n  fdpg-scale toy --divergences kl rkl js")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a policy with f-DPG",
                       description="Train with f-DPG. Rank and world size come from torchrun, the deepspeed "
                                   "launcher or SLURM's variables; one process trains alone.")
    p.add_argument("--config", required=True, help="YAML config file (e.g. configs/smoke.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides with dotted keys, e.g. train.steps=20 divergence.name=rkl")
    p.set_defaults(run=_train)

    p = sub.add_parser("export", help="export the latest checkpoint's policy as a Hugging Face directory",
                       description="Write the latest checkpoint's policy of OUTPUT_DIR as a Hugging Face "
                                   "directory (safetensors, config, tokenizer) that from_pretrained loads.")
    p.add_argument("output_dir", help="a run's output_dir (holds checkpoints/)")
    p.add_argument("--to", required=True, help="destination directory")
    p.set_defaults(run=_export)

    for name, (_, text) in _DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False,
                       description=f"{text}. See 'fdpg-scale {name} --help' for its options.")
    return parser


def _launch_rank() -> int:
    """This process's rank as the launcher set it (torchrun / deepspeed: RANK; srun: SLURM_PROCID), else 0.

    Read from the environment because the error may come before (or instead of) the process group."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def _report(err: Exception, prefix: str, status: int) -> int:
    """Print ``err`` as one line on stderr and return ``status``. An error every rank raises alike is printed
    by rank 0 only (once per run, not once per rank); one that only some ranks may see names its rank."""
    text = " ".join(str(err).split())  # one line, whatever the message held
    rank = _launch_rank()
    if rank == 0:
        print(f"fdpg-scale: {prefix}{text}", file=sys.stderr, flush=True)
    elif not getattr(err, "every_rank", False):
        print(f"fdpg-scale: [rank {rank}] {prefix}{text}", file=sys.stderr, flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    from fdpg_scale.apps.evaluate import ConstraintNeverSatisfied

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in _DELEGATED:
            return _run_delegated(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        return args.run(args)
    except ConfigError as err:
        return _report(err, "config error: ", EXIT_BAD_INPUT)
    except NonFiniteError as err:
        return _report(err, "", EXIT_NONFINITE)
    except (FileNotFoundError, FileExistsError, CheckpointError, ConstraintNeverSatisfied) as err:
        # Errors about the user's files or task: one line, no traceback.
        return _report(err, "", EXIT_BAD_INPUT)


if __name__ == "__main__":
    sys.exit(main())
