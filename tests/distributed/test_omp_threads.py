"""serial_side_threads: after the product's init_distributed, gloo's threads run their copies on one OpenMP thread
(no extra team that would make libgomp throttle the main thread's spin-wait), and the main thread keeps its count.

Each check runs in a fresh interpreter with OMP_NUM_THREADS=2: OpenMP's thread teams and ATen's per-thread counts
are process state that this test process (and xdist's other tests in it) has already set.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.harness import REPO, cli_env

PROBE = r"""
import json, os, sys, threading, torch
from fdpg_scale.distributed import launch

if sys.argv[1] == "without":   # the control: the same process with the remedy taken out
    launch.serial_side_threads = torch.get_num_threads
torch.ones(1 << 20).add_(1)    # the main thread's own OpenMP team is up before the group starts

def threads():
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))

launch.init_distributed()
before = threads()
big, out = torch.randn(1 << 20), torch.empty(1 << 20)
for _ in range(4):  # a ZeRO-3 gather of a 1 M-float tensor, on gloo's worker threads
    torch.distributed.all_gather_into_tensor(out, big)
after = threads()
seen = []
helper = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
helper.start(); helper.join()
print(json.dumps({"new_threads": len(after) - len(before), "main": torch.get_num_threads(), "other": seen[0]}))
torch.distributed.destroy_process_group()
"""


def _probe(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=REPO,
                          env={**cli_env(DS_ACCELERATOR="cpu"), "OMP_NUM_THREADS": "2"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")
def test_gloo_threads_start_no_openmp_team_and_main_keeps_its_threads():
    fixed = _probe("with")
    assert fixed == {"new_threads": 0, "main": 2, "other": 1}
    # The control shows the test can fail: without the remedy gloo's threads start OpenMP workers of their own.
    control = _probe("without")
    assert control["new_threads"] > 0 and control["other"] == 2 and control["main"] == 2


def test_one_thread_is_left_alone(monkeypatch):
    import torch

    from fdpg_scale.distributed import omp_threads

    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pytest.fail("set_num_threads called with 1 thread"))
    assert omp_threads.serial_side_threads() == 1
