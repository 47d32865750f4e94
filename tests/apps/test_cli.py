"""The command line: ``--help`` of every command answers without loading torch, DeepSpeed or Triton; every
command's job exists; user errors are one line with exit status 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "deepspeed", "triton", "transformers")


def test_help_of_every_command_loads_no_heavy_module():
    """In a fresh interpreter: import the public entry point, print the help of the tool and of each command."""
    code = f"""
import contextlib, io, json, sys
import fdpg_scale.cli
after_import = sorted(m for m in {HEAVY!r} if m in sys.modules)
from fdpg_scale.apps.cli import COMMANDS, main
helps = {{}}
for argv in [[]] + [[name] for name in COMMANDS]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv + ["--help"])
        except SystemExit as exit:
            assert exit.code == 0, (argv, exit.code)
    helps[" ".join(argv)] = out.getvalue()
print(json.dumps({{"after_import": after_import, "loaded": sorted(m for m in {HEAVY!r} if m in sys.modules),
                  "helps": helps}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["after_import"] == [] and result["loaded"] == []
    from fdpg_scale.apps.cli import COMMANDS

    assert set(result["helps"]) == {"", *COMMANDS}
    for name in COMMANDS:
        assert re.search(rf"\n    {name}\s", result["helps"][""]), name  # listed in fdpg-scale --help
        assert result["helps"][name].startswith(f"usage: fdpg-scale {name}")
    assert "--gpus-per-node" in result["helps"]["plan"] and "--n-embd" in result["helps"]["pretrain-base"]


def test_console_script_help_is_fast():
    """The installed ``fdpg-scale --help``: well under the ~12 s it took when it imported torch."""
    script = Path(sys.executable).with_name("fdpg-scale")
    if not script.exists():
        pytest.skip(f"no console script beside {sys.executable}")
    start = time.perf_counter()
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0 and "pretrain-base" in proc.stdout
    assert elapsed < 5.0, f"fdpg-scale --help took {elapsed:.1f} s"


def test_every_command_names_a_job_that_exists():
    import importlib

    from fdpg_scale.apps.cli import COMMANDS

    for name, (_, _, _, job) in COMMANDS.items():
        module, _, function = job.partition(":")
        assert callable(getattr(importlib.import_module(module), function, None)), (name, job)


def test_divergence_help_lists_the_registered_names():
    """The help text cannot import the registry (it needs torch): it is checked against it here."""
    from fdpg_scale.apps.cli import _DIVERGENCE_HELP
    from fdpg_scale.core.divergences import DIVERGENCE_NAMES

    listed = _DIVERGENCE_HELP[_DIVERGENCE_HELP.index("(") + 1:_DIVERGENCE_HELP.index(")")].split()
    assert listed == list(DIVERGENCE_NAMES)


def test_user_errors_are_one_line_with_status_2(tmp_path, capsys):
    from fdpg_scale.apps.cli import main

    assert main(["sweep", "--configs", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("fdpg-scale: sweep: config file not found") and "nope.yaml" in err
    assert main(["eval", str(tmp_path)]) == 2  # a directory that is no run
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "config.yaml" in err
    with pytest.raises(SystemExit) as exit:
        main(["train"])  # --config missing: argparse's usage error
    assert exit.value.code == 2
    assert "--config" in capsys.readouterr().err
