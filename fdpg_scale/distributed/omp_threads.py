"""Keep the collective backend's threads from slowing every op of the main thread (CPU, one process, N threads).

What goes wrong without this. On the CPU, gloo runs each collective on its own worker threads
(``pt_gloo_runloop``), and a collective over a large tensor copies it with ATen's parallel loops. The first time a
thread runs such a loop it starts its own OpenMP team of ``torch.get_num_threads()`` threads, and those teams stay.
With one process and 2 threads on 2 cores, a ZeRO-3 all-gather (every forward of a ZeRO-3 engine gathers, even on
one rank) therefore leaves libgomp managing more threads than there are cores, and libgomp then throttles its
spin-wait: after each parallel region the main thread's workers go to sleep on a futex and every later op pays a
wake-up. Measured on the 2-core dev box (benchmarks/README.md, "vs_trl"): a [32, 1, 128] layer norm went from
8 µs to 50–85 µs after one all-gather of 1 M floats, and sampling 32 × 24 tokens from the demo's 1 M model from
0.11–0.15 s to 0.33–0.37 s. ``OMP_WAIT_POLICY=active`` hides it but makes the gloo threads' idle workers spin on
the cores the main thread computes on.

The remedy. ATen gives each thread its OpenMP thread count once, at the thread's first parallel op, from a
process-wide value that ``torch.set_num_threads`` sets (and that also sets the calling thread's own count). Setting
it to 1 *from a short-lived helper thread* leaves the main thread at its N threads and makes every thread that
starts parallel work afterwards (gloo's, DeepSpeed's) run it on one thread: their copies are memory-bound, and no
second team competes for the cores. It must run before the process group starts, and only matters where ATen's
parallel backend is OpenMP.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["serial_side_threads"]


def _openmp_backend() -> bool:
    return "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


def serial_side_threads() -> int:
    """Make threads other than this (main) one run ATen's parallel loops on one OpenMP thread, this thread keeping
    its count (module docstring); -> this thread's count, ``torch.get_num_threads()``, unchanged.

    Call it from the main thread before the process group starts (gloo's threads are made then). A no-op when
    the main thread runs one thread anyway or ATen's parallel backend is not OpenMP. Raises RuntimeError if the
    main thread's count changed (a torch whose ``set_num_threads`` is no longer per-thread).
    """
    own = torch.get_num_threads()   # also fixes this thread's count: ATen's per-thread lazy initialisation
    if own == 1 or not _openmp_backend():
        return own
    helper = threading.Thread(target=torch.set_num_threads, args=(1,), name="fdpg-serial-side-threads")
    helper.start()
    helper.join()
    if torch.get_num_threads() != own:
        torch.set_num_threads(own)
        raise RuntimeError(f"setting other threads' OpenMP count changed the main thread's from {own} to "
                           f"{torch.get_num_threads()}: this torch's thread settings are not per-thread")
    return own
