"""Progress for long loops outside training (sampling, FID, likelihood): a rich bar with an ETA in a terminal,
one plain line every ``every_seconds`` otherwise (logs, ``> file``, CI), and after the first batch an estimate
of the whole job, so a long evaluation never runs silently."""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def duration(seconds: float) -> str:
    """1h 02m, 3m 20s, 12.3s."""
    seconds = max(float(seconds), 0.0)
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"
    return f"{seconds:.1f}s"


class Phase:
    """Where a command is and what it has kept so far, for the one line it ends with when Ctrl-C or SIGTERM stops
    it (exit 128 + the signal): ``stopped by SIGINT while loading the model: nothing was written; run the same
    command again``. ``kept`` may be a function (counted when the stop comes)."""

    def __init__(self, phase: str = "starting", kept="nothing was written", how: str = "run the same command again"):
        self.phase, self.kept, self.how = phase, kept, how

    def at(self, phase: str, kept=None, how: str | None = None) -> None:
        self.phase, self.kept, self.how = phase, kept or self.kept, how or self.how

    def line(self, signum: int, kept: str | None = None, how: str | None = None) -> str:
        kept = kept or (self.kept() if callable(self.kept) else self.kept)
        return f"stopped by {signal.Signals(signum).name} while {self.phase}: {kept}; {how or self.how}"


def say(line: str, log_path: str | Path | None = None, stream=None) -> None:
    """Print one line (stdout by default) and append it to ``log_path`` (a run's train.log)."""
    print(line, file=stream or sys.stdout, flush=True)
    if log_path is not None:
        with open(log_path, "a") as f:
            f.write(line + "\n")


def track(items: Iterable[T], total: int | None = None, description: str = "", *, enabled: bool = True,
          every_seconds: float = 30.0, estimate: bool = True, unit: str = "batches") -> Iterator[T]:
    """Iterate over ``items`` showing progress on stderr.

    In a terminal: rich's bar with done/total, elapsed time and remaining time. Otherwise: a line every
    ``every_seconds`` (``description: 12/196 batches, 3.1 s/batch, ETA 10m 05s``). With ``estimate``, the
    time of the first item gives an estimate of the total, printed once in either mode.
    """
    if not enabled:
        yield from items
        return
    total = len(items) if total is None and hasattr(items, "__len__") else total
    if sys.stderr.isatty():
        yield from _rich(items, total, description, estimate, unit)
    else:
        yield from _plain(items, total, description, every_seconds, estimate, unit)


def _estimate_line(description: str, first_s: float, total: int | None, unit: str) -> str | None:
    if not total or total < 2:
        return None
    return (f"{description}: first of {total} {unit} took {duration(first_s)}; "
            f"about {duration(first_s * total)} in all on this device")


def _rich(items, total, description, estimate, unit):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    console = Console(stderr=True)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        start = time.perf_counter()
        for i, item in enumerate(items):
            yield item
            bar.advance(task)
            if i == 0 and estimate:
                line = _estimate_line(description, time.perf_counter() - start, total, unit)
                if line:
                    bar.console.print(line, highlight=False)


def _plain(items, total, description, every_seconds, estimate, unit):
    start = last = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if done == 1 and estimate:
            line = _estimate_line(description, now - start, total, unit)
            if line:
                print(line, file=sys.stderr, flush=True)
        if now - last >= every_seconds or (total and done == total and now - start >= every_seconds):
            last = now
            per = (now - start) / done
            eta = f", ETA {duration(per * (total - done))}" if total else ""
            print(f"{description}: {done}/{total or '?'} {unit}, {per:.2f} s each{eta}", file=sys.stderr,
                  flush=True)
