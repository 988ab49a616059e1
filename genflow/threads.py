"""CPU threads that never make a busy machine worse.

torch's default is one OpenMP thread per core of the machine, with threads that spin while they wait. On a
shared or container-limited machine that means more threads than CPUs actually granted, spinning against
each other and against other jobs. genflow instead uses the CPUs available to *this process* (its CPU
affinity, capped by a cgroup CPU quota where one is readable) less those other processes keep busy when it
starts, and OpenMP threads that spin only briefly (``GOMP_SPINCOUNT=1000``) before they sleep. Measured on
the 2-core machine (README, Benchmarks): a passive wait policy costs 31 % on an idle machine, unbounded
spinning halves the speed next to one busy process, the short spin keeps 90 % of the idle speed and
degrades gently. Both can be overridden: ``OMP_NUM_THREADS`` (``make ... THREADS=N``), ``GOMP_SPINCOUNT``
and ``OMP_WAIT_POLICY``.

The spin count is read by OpenMP when torch loads, so it is set in ``genflow/__init__.py`` (before any
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


def busy_elsewhere(samples: int = 5, interval: float = 0.02) -> int:
    """Processes running on the machine right now besides this one (the median of a few snapshots of the
    kernel's run queue; 0 where /proc/loadavg is not readable)."""
    import statistics
    import time

    counts = []
    for _ in range(samples):
        try:
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        counts.append(running - 1)  # this process is running while it reads
        time.sleep(interval)
    return max(0, int(statistics.median(counts)))


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """(threads, why): an explicit request, else OMP_NUM_THREADS, else the available CPUs that other
    processes do not keep busy (at least one)."""
    if requested:
        return int(requested), "requested"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    cpus, busy = available_cpus(), busy_elsewhere()
    if busy:
        return max(1, cpus - busy), f"{cpus} CPUs available to this process, {busy} busy with other work"
    return cpus, "CPUs available to this process"


def configure_threads(requested: int | None = None) -> str:
    """Set torch's intra-op threads; returns one line saying what was chosen and why."""
    import torch

    threads, why = choose_threads(requested)
    torch.set_num_threads(threads)
    waiting = ", ".join(f"{k}={os.environ[k]}" for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY") if os.environ.get(k))
    return f"{threads} CPU thread{'s' if threads != 1 else ''} ({why}; {waiting or 'OpenMP default wait'})"
