"""How many threads torch uses: the CPUs this process may run on (its affinity), not the machine's count, unless
OMP_NUM_THREADS says otherwise (set it, e.g. to 1, to share the CPU with another job). A 2-core slot of a 64-core
machine runs 2 threads, not 64 that fight over 2 cores."""
from __future__ import annotations

import os

import torch


def cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def use_this_process_cpus() -> None:
    """torch's intra-op threads = `cpus()`, unless OMP_NUM_THREADS is set. Each command line calls it once."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpus())
