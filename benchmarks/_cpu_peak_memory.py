"""Peak extra resident memory of a block of CPU work, from the kernel's own high-water mark (no tracing).

Shared by bench_kernels.py and _train_bench_worker.py (both run as scripts from this folder):

    before = start_cpu_peak()      # malloc_trim(0), reset VmHWM to VmRSS, return VmRSS in bytes
    ...                            # the work
    extra = cpu_peak_since(before) # VmHWM − before, in bytes

malloc_trim hands back heap pages glibc kept from earlier work, so that they are not hidden in "before";
writing "5" to /proc/self/clear_refs resets VmHWM to the current VmRSS (Linux ≥ 4.0).
"""

from __future__ import annotations

import ctypes
import ctypes.util

_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))


def proc_status_kb(field: str) -> int:
    """One ``kB`` field of /proc/self/status (e.g. VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def start_cpu_peak() -> int:
    """Trim the heap, reset VmHWM; returns the resident bytes now (the baseline for cpu_peak_since)."""
    _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status_kb("VmRSS") * 1024


def cpu_peak_since(before: int) -> int:
    """Bytes the resident set peaked above ``before`` since start_cpu_peak()."""
    return proc_status_kb("VmHWM") * 1024 - before
