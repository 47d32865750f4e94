"""The installed package's requirements admit a typical GPU image (Python 3.12, torch 2.11, triton 3.6,
transformers 5.17), and the offline bundle script refuses bad arguments in one line."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
IMAGE = {"torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0"}


def test_requirement_ranges_admit_the_gpu_image():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "3.12" in SpecifierSet(project["requires-python"])
    reqs = {Requirement(r).name.lower(): Requirement(r) for r in project["dependencies"]}
    for name, version in IMAGE.items():
        assert reqs[name].specifier.contains(version), f"{name} {reqs[name].specifier} refuses {version}"


@pytest.mark.parametrize("args, needle", [([], "usage"), (["d", "--python-version", "12"], "look like 3.12"),
                                          (["d", "--bogus"], "unknown argument --bogus")])
def test_offline_wheels_bad_arguments(tmp_path, args, needle):
    run = subprocess.run(["bash", str(ROOT / "scripts/offline_wheels.sh"), *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and needle in run.stderr, run.stderr
