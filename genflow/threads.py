"""CPU threads that never make a busy machine worse.

torch's default is one OpenMP thread per core of the machine, with threads that spin while they wait. On a
shared or container-limited machine that means more threads than CPUs actually granted, spinning against
each other and against other jobs. genflow instead uses the CPUs available to *this process* (its CPU
affinity, capped by a cgroup CPU quota where one is readable) and a passive OpenMP wait policy. Both can be
overridden: ``OMP_NUM_THREADS`` (``make ... THREADS=N``) and ``OMP_WAIT_POLICY``.

The wait policy is read by OpenMP when torch loads, so it is set in ``genflow/__init__.py`` (before any
entry point imports torch) and in the Makefile.
"""
from __future__ import annotations

import math
import os
from pathlib import Path


def cgroup_cpu_limit() -> float | None:
    """CPUs granted by a cgroup quota (v2 ``cpu.max`` or v1 ``cfs_quota_us``), or None without a quota."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup quota (rounded down, at least 1)."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        count = min(count, max(1, math.floor(quota)))
    return max(1, count)


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """(threads, why): an explicit request, else OMP_NUM_THREADS, else the available CPUs."""
    if requested:
        return int(requested), "requested"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    return available_cpus(), "CPUs available to this process"


def configure_threads(requested: int | None = None) -> str:
    """Set torch's intra-op threads; returns one line saying what was chosen and why."""
    import torch

    threads, why = choose_threads(requested)
    torch.set_num_threads(threads)
    policy = os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP default)")
    return f"{threads} CPU thread{'s' if threads != 1 else ''} ({why}; OMP_WAIT_POLICY={policy})"
