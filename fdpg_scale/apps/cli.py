"""The ``fdpg-scale`` command line: every command's options, parsed here; the job runs in its own module.

    fdpg-scale train --config FILE [key=value ...]     f-DPG training (torchrun / deepspeed launcher / SLURM)
    fdpg-scale train --nproc-per-node N --config FILE  the same on N ranks of this node, checked first, via torchrun
    fdpg-scale export OUTPUT_DIR --to HF_DIR           latest checkpoint's policy → Hugging Face directory
    fdpg-scale eval OUTPUT_DIR                         alignment, KL(p‖π), KL(π‖a), diversity of the latest policy
    fdpg-scale sweep --configs A.yaml [B.yaml] [--divergences kl rkl js]   runs + report.md with plots
    fdpg-scale demo                                    pretrain-base, then a sweep of configs/demo.yaml on 2 ranks
    fdpg-scale pretrain-base                           the demo's base model, trained on the stdlib (cached)
    fdpg-scale plan --config FILE --nodes N --gpus-per-node G   per-GPU memory plan
    fdpg-scale prompts                                 conditional-task prompts from the held-out stdlib corpus
    fdpg-scale toy [--divergences kl rkl ...]          f-DPG on an enumerable toy, exact divergences per step
    fdpg-scale reproduce [--quick | --grid F] [--out DIR]   the paper's claims: tasks × sizes × divergences × seeds

Why the options live here and not beside each job: the jobs import torch, DeepSpeed and Triton (seconds to
load), and ``--help`` of any command should answer at once. So this module, and everything it imports at
the top, loads none of them (``tests/apps/test_cli.py`` checks it); each command names its job as
``"module:function"``, imported only when the command runs, and called with the parsed arguments
(``args.argv`` holds the command line after ``fdpg-scale``).

Exit status: the job's own, or 2 with one line on stderr for a user error (``fdpg_scale.errors``, a missing
file) and for a bad option (argparse's usage error), 3 for a run stopped on non-finite values, 4 for a rank whose
collective failed (another rank hung past ``distributed.timeout_s`` or died).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import fields
from pathlib import Path

from fdpg_scale.errors import (EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_RANK_LOST, CheckpointError, ConfigError,
                               ConstraintNeverSatisfied, NonFiniteError, RankLostError, ScorerError)

__all__ = ["main", "build_parser", "COMMANDS"]

_EXAMPLES = """examples:
  fdpg-scale train --config configs/smoke.yaml train.steps=20 divergence.name=rkl
  fdpg-scale train --nproc-per-node 2 --config configs/smoke.yaml
  torchrun --standalone --nproc_per_node 2 -m fdpg_scale.cli train --config configs/smoke.yaml
  fdpg-scale export runs/smoke --to runs/smoke-hf
  fdpg-scale toy --divergences kl rkl js"""
_DIVERGENCE_HELP = "divergence names as in divergence.name (kl rkl tv js chi2 rchi2 hellinger alpha)"


# ------------------------------------------------------------------------------------------ commands
def _train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file (e.g. configs/smoke.yaml)")
    p.add_argument("--nproc-per-node", metavar="N", default=None,
                   help="check the run for N ranks, then start them on this node with torchrun (forwarding "
                        "SIGUSR1/SIGTERM to them and their exit status); without it: one process, or the ranks of "
                        "the torchrun / deepspeed / srun job that started this one")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides with dotted keys, e.g. train.steps=20 divergence.name=rkl")


def _export(p: argparse.ArgumentParser) -> None:
    p.add_argument("output_dir", help="a run's output_dir (holds checkpoints/)")
    p.add_argument("--to", required=True, help="destination directory")


def _eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("output_dir", help="a run's output_dir (config.yaml and checkpoints/)")
    p.add_argument("--samples", type=int, default=256, help="sequences drawn from each model (default 256)")
    p.add_argument("--base-samples", type=int, default=2048,
                   help="base draws behind KL(p‖π) and the rejection-sampled gain (default 2048)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the evaluation's draws (default: derived from the run's seed, fresh per run seed)")


def _sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", nargs="+", type=Path, required=True, help="run configs (tasks, model sizes)")
    p.add_argument("--divergences", nargs="+", default=["kl", "rkl", "js"],
                   help=f"{_DIVERGENCE_HELP}; alpha:0.5 for an α-divergence (default: kl rkl js)")
    p.add_argument("--out", type=Path, default=Path("runs/sweep"), help="sweep directory (default runs/sweep)")
    p.add_argument("--nproc", type=int, default=1, help="ranks per run (torchrun --standalone), default 1")
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")


def _demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="demo directory (default runs/demo)")
    p.add_argument("--divergences", nargs="+", default=["kl", "rkl", "js"], help=_DIVERGENCE_HELP)
    p.add_argument("--nproc", type=int, default=2, help="ZeRO-3 ranks per run (default 2)")
    p.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")


def _pretrain(p: argparse.ArgumentParser) -> None:
    from fdpg_scale.models.base_config import DEFAULT_OUT, PretrainConfig  # light: a dataclass

    p.add_argument("--out", default=str(DEFAULT_OUT), help="output Hugging Face directory (default: %(default)s)")
    p.add_argument("--corpus", default=None, help="directory of .py files (default: this Python's stdlib)")
    p.add_argument("--doc", default=None, help="also write the Markdown report page here (e.g. docs/base_model.md)")
    p.add_argument("--log-every", type=int, default=50, help="print the training loss every N steps")
    for f in fields(PretrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"(default: {f.default})")


def _plan(p: argparse.ArgumentParser) -> None:
    from fdpg_scale.apps.plan import GPUS  # light: the planner is arithmetic on config files

    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--arch", help="name under configs/models/ (default: the config file's stem) when "
                                  "model.path has no config.json")
    p.add_argument("--prompt-tokens", type=int, default=64,
                   help="prompt length added to sampling.max_new_tokens (default 64)")
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", choices=sorted(GPUS), help="check the fit against this GPU")
    gpu.add_argument("--gpu-memory-gib", type=float, help="check the fit against this much memory per GPU")
    p.add_argument("--reserve-gib", type=float, default=4.0,
                   help="kept free for the CUDA context, allocator fragmentation, buckets (default 4)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")


def _prompts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path(".cache/prompts/stdlib_signatures.jsonl"))
    p.add_argument("--n", type=int, default=32, help="number of prompts (default 32)")
    p.add_argument("--corpus", type=Path, default=None, help="corpus directory (default: the stdlib)")


def _toy(p: argparse.ArgumentParser) -> None:
    p.add_argument("--divergences", nargs="+", default=["kl", "rkl"],
                   help=f"divergences to train with ({_DIVERGENCE_HELP}; alpha needs --alpha)")
    p.add_argument("--alpha", type=float, default=None, help="α for the 'alpha' divergence")
    p.add_argument("--steps", type=int, default=80, help="optimizer steps per divergence")
    p.add_argument("--batch", type=int, default=256, help="samples per step")
    p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the base LM and of the sampler")
    p.add_argument("--target", choices=("exponential", "pointwise"), default="exponential")
    p.add_argument("--on-policy", action="store_true", help="sample from π instead of a proposal q")
    p.add_argument("--print-every", type=int, default=10, help="print the exact metrics every k steps")
    p.add_argument("--record", metavar="FILE", default=None,
                   help="instead: write the convergence table (the test's settings) as markdown to FILE")
    p.add_argument("--proposal-rules", action="store_true",
                   help="instead: how often the recorded-π and the current-π proposal rules agree with the exact "
                        "answer (fdpg_scale.toy.proposal_rules), as JSON")


def _reproduce(p: argparse.ArgumentParser) -> None:
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true",
                      help="the miniature: the tiny base, two tasks, two seeds, 20 steps: 16 runs (417 s on 2 "
                           "idle cores with no base cached, 111 s of it pretraining the base)")
    grid.add_argument("--grid", type=Path, metavar="FILE",
                      help="your own grid: a YAML file of the Grid's fields (name, sizes, cells, divergences, "
                           "seeds, steps, ...; see docs/reproduction.md); relative paths in it are relative to "
                           "the current directory")
    p.add_argument("--out", type=Path, default=Path("runs/reproduce"), help="output directory (default runs/reproduce)")
    stage = p.add_mutually_exclusive_group()
    stage.add_argument("--count", action="store_true", help="print the number of runs in the grid and stop")
    stage.add_argument("--prepare", action="store_true", help="only build the bases and the prompts")
    stage.add_argument("--cell", type=int, metavar="I", help="only train and evaluate run I (a SLURM array task)")
    stage.add_argument("--report", action="store_true", help="only write report.md and results.json from the runs")
    stage.add_argument("--rejudge", type=Path, metavar="RESULTS",
                       help="only judge the claims again, by the current rules, from a recorded results.json's "
                            "per-run records (nothing runs): writes OUT/verdicts.json and OUT/verdicts.md")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="without a stage option: train and evaluate N runs at a time, each in its own process with "
                        "its share of the cores (default: one per usable core, at most 4; 1 runs them one after "
                        "another from this process, each still training in its own process)")


#: name -> (one-line help, description, adds the options, the job as "module:function" taking the Namespace)
COMMANDS = {
    "train": ("train a policy with f-DPG",
              "Train with f-DPG. Rank and world size come from torchrun, the deepspeed launcher or SLURM's "
              "variables; one process trains alone; --nproc-per-node N checks the run for N ranks, then starts "
              "them with torchrun.", _train, "fdpg_scale.apps.cli:_run_train"),
    "export": ("export the latest checkpoint's policy as a Hugging Face directory",
               "Write the latest checkpoint's policy of OUTPUT_DIR as a Hugging Face directory (safetensors, "
               "config, tokenizer) that from_pretrained loads.", _export, "fdpg_scale.apps.cli:_run_export"),
    "eval": ("evaluate a run's latest policy against its target and base model",
             "Evaluate a trained policy against its target and its base model, by plain Monte Carlo in one "
             "process; writes OUTPUT_DIR/eval.json.", _eval, "fdpg_scale.apps.evaluate:run"),
    "sweep": ("train and evaluate configs × divergences, write report.md with plots",
              "Train and evaluate every (config, divergence) pair, then write report.md.", _sweep,
              "fdpg_scale.apps.sweep:run"),
    "demo": ("the embedded default: pretrain the base, f-DPG with kl/rkl/js on 2 ranks, report with plots",
             "The first command's job, offline on a CPU in minutes: pretrain-base, f-DPG under ZeRO-3 per "
             "divergence, evaluation and report.md.", _demo, "fdpg_scale.apps.demo:run"),
    "pretrain-base": ("train the base model (BPE tokenizer + small GPT-2) on the Python standard library, cached",
                      "Pretrain (or reuse) the GPT-2 base model on the Python stdlib source.", _pretrain,
                      "fdpg_scale.apps.pretrain:run"),
    "plan": ("per-GPU memory plan of a config on N nodes × G GPUs",
             "Per-GPU memory plan of a run config on N nodes × G GPUs; exit status 1 when it does not fit.",
             _plan, "fdpg_scale.apps.plan:run"),
    "prompts": ("write conditional-task prompts (function signatures) from the held-out stdlib corpus",
                "Contexts for conditional tasks: function signatures from the held-out documents of the "
                "standard-library corpus, written as JSON lines.", _prompts, "fdpg_scale.apps.prompt_corpus:run"),
    "toy": ("f-DPG on an enumerable toy model, exact divergences per step",
            "Sampled f-DPG on the enumerable toy, with the exact divergences printed as it trains.", _toy,
            "fdpg_scale.apps.toy:run"),
    "reproduce": ("reproduce the f-DPG paper's claims: bases of 3 sizes, 5 tasks, 4 divergences, seeds, verdicts",
                  "Reproduce the paper's findings at small scale: pretrain the bases, train and evaluate every run "
                  "of the grid, write report.md and results.json with a verdict per claim. The grid: the full one, "
                  "--quick's miniature, or your own (--grid FILE). Without a stage option the whole grid runs: the "
                  "bases, then the runs in worker processes (--workers at a time, each run a `reproduce --cell I` "
                  "process, as a SLURM array task is), then the report.", _reproduce,
                  "fdpg_scale.apps.reproduce:run"),
}


def _run_train(args: argparse.Namespace) -> int:
    if args.nproc_per_node is not None:
        from fdpg_scale.apps.train_launch import launch

        return launch(args)
    from fdpg_scale.training.config import load_config
    from fdpg_scale.training.loop import train

    train(load_config(args.config, args.overrides))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from fdpg_scale.distributed.export import export_latest

    path = export_latest(args.output_dir, args.to)
    print(f"exported the policy of {path} to {args.to}")
    return 0


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    """The whole command line (every command and its options); imports no job module."""
    parser = argparse.ArgumentParser(
        prog="fdpg-scale", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EXAMPLES,
        description="Align a language model to a target distribution by f-divergence minimisation (f-DPG), "
                    "with DeepSpeed ZeRO-3.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, description, add_arguments, job) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=description)
        add_arguments(p)
        p.set_defaults(job=job)
    return parser


def _job(spec: str):
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


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



def _hard_exit(status: int) -> None:
    """Leave at once with ``status``, skipping the interpreter's teardown. After a failed collective the process
    group's threads still wait on the lost rank: a normal exit would hang in their destructors or abort in them
    ("terminate called without an active exception", SIGABRT), replacing the status and adding lines after ours."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, return its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse ends a nargs="*" positional at the first option, so key=value overrides written after one
        # (`train --config F a=1 --nproc-per-node 2 b=2`) come back unrecognised: they are overrides all the same.
        if not hasattr(args, "overrides") or any(a.startswith("-") for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    args.argv = argv
    try:
        return _job(args.job)(args) or 0
    except ConfigError as err:
        return _report(err, "config error: ", EXIT_BAD_INPUT)
    except NonFiniteError as err:
        return _report(err, "", EXIT_NONFINITE)
    except RankLostError as err:
        _hard_exit(_report(err, "", EXIT_RANK_LOST))
    except (FileNotFoundError, FileExistsError, CheckpointError, ConstraintNeverSatisfied,
            ScorerError) as err:
        # Errors about the user's files or task: one line, no traceback.
        return _report(err, "", EXIT_BAD_INPUT)


if __name__ == "__main__":
    sys.exit(main())
