"""User-facing errors and the one error path of every entry point.

Every mistake a user can make ends in one of these, worded as what went wrong, why it matters, and how
to fix it, and raised before any expensive work starts. ``train.py``, ``sample.py``,
``python -m genflow.apps.evaluate`` and ``python -m genflow.apps.leaderboard`` all report them the same way:

    error: <what>
      why: <why>
      fix: <fix>

and exit with status 2, never with a traceback. ``--debug`` on the command line or ``GENFLOW_DEBUG=1``
re-raises instead, so the traceback is shown.
"""
from __future__ import annotations

import errno
import functools
import os
import re
import sys

EXIT_BAD_INPUT = 2


class GenflowError(Exception):
    """Base class for genflow's own errors."""


class ConfigError(GenflowError, ValueError):
    """A configuration value, file or path is wrong or missing."""


class CheckpointError(GenflowError):
    """A checkpoint is missing, corrupt, foreign, or does not match the requested configuration."""


class TrainingDiverged(GenflowError, RuntimeError):
    """The loss became NaN or infinite."""


class RegressionFound(GenflowError):
    """The leaderboard's gate: an entry's FID got worse than its last record allows (exit status 3)."""

    exit_code = 3


def config_error(what: str, why: str, fix: str) -> ConfigError:
    return ConfigError(f"{what}\n  why: {why}\n  fix: {fix}")


def checkpoint_error(what: str, why: str, fix: str) -> CheckpointError:
    return CheckpointError(f"{what}\n  why: {why}\n  fix: {fix}")


#: the failures of writing a file that a user fixes outside genflow (space, permission, a read-only disk)
DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}
#: what torch's zip writer says when the file system refuses a write (the errno is lost on the way)
TORCH_WRITE_FAILURES = ("inline_container.cc", "PytorchStreamWriter failed writing")


class WriteFailed(GenflowError):
    """A file could not be written (a full disk, a quota, a read-only or unwritable folder): error / why / fix,
    naming the file. ``fix`` may be replaced by the caller that knows how to continue (train.py's command)."""

    def __init__(self, path, why: str, fix: str):
        self.path, self.why, self.fix = path, why, fix
        super().__init__(path, why, fix)

    def __str__(self) -> str:
        return f"could not write {self.path}\n  why: {self.why}\n  fix: {self.fix}"


def nearest_existing(path):
    """``path`` or its nearest parent that exists (what a write to ``path`` needs), None when none does."""
    from pathlib import Path

    p = Path(str(path)).expanduser().absolute()
    return next((q for q in (p, *p.parents) if q.exists()), None)


def free_bytes(path) -> int | None:
    """The free bytes on the file system ``path`` would be written to (its nearest existing part), None when
    unknown."""
    import shutil

    existing = nearest_existing(path)
    try:
        return None if existing is None else shutil.disk_usage(existing).free
    except OSError:
        return None


def free_space(path) -> str:
    """"N MB free" on the file system of ``path``, or "" when unknown."""
    free = free_bytes(path)
    return "" if free is None else f"{free / 1e6:.1f} MB free"


def os_error(err: BaseException, path=None) -> WriteFailed | None:
    """A disk-full, read-only or permission ``OSError`` (or torch's zip writer failing: its message has lost the
    errno) as ``error: could not write <file> / why / fix``; None for any other error (a bug or a failure
    genflow cannot explain)."""
    where = path or getattr(err, "filename", None) or "a file"
    space = free_space(where) if where != "a file" else ""
    if isinstance(err, RuntimeError) and any(mark in str(err) for mark in TORCH_WRITE_FAILURES):
        detail = str(err).strip().splitlines()[0]
        why = f"the file system refused a write, as a full disk or a used-up quota does (torch: {detail}" + \
              (f"; {space} there now)" if space else ")")
        return WriteFailed(where, why, "free space on that disk (or write elsewhere), then run the same command again")
    if not isinstance(err, OSError):  # a Rust writer (safetensors) names the errno in its message
        found = re.search(r"\(os error (\d+)\)", str(err))
        if found is None or int(found.group(1)) not in DISK_ERRNOS:
            return None
        err = OSError(int(found.group(1)), os.strerror(int(found.group(1))))
    why = DISK_ERRNOS.get(err.errno)
    if why is None:
        return None
    full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    why = f"{why} ({space})" if full and space else f"{why} ({err.strerror or err})"
    fix = ("free space on that disk (or write elsewhere), then run the same command again" if full else
           "make that folder writable or choose another output folder, then run the same command again")
    return WriteFailed(where, why, fix)


def debug_requested() -> bool:
    """``--debug`` (removed from ``sys.argv`` by ``strip_debug_flag``) or ``GENFLOW_DEBUG=1``."""
    return os.environ.get("GENFLOW_DEBUG", "") not in ("", "0")


def strip_debug_flag() -> None:
    """Take ``--debug`` out of ``sys.argv`` (Hydra would reject it) and remember it in ``GENFLOW_DEBUG``."""
    if "--debug" in sys.argv[1:]:
        sys.argv = [sys.argv[0]] + [a for a in sys.argv[1:] if a != "--debug"]
        os.environ["GENFLOW_DEBUG"] = "1"
    if debug_requested():
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")


def report(err: GenflowError) -> None:
    """Print the error as ``error: what / why / fix`` and exit 2 (SystemExit passes through Hydra); an
    error class may name its own status (``exit_code``)."""
    print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(getattr(err, "exit_code", EXIT_BAD_INPUT))


def exit_on_error(main, *args, **kwargs):
    """Run a command-line entry point: a genflow error ends the process with its message and exit
    status 2, without a traceback (the message already says what, why and how to fix)."""
    try:
        return main(*args, **kwargs)
    except GenflowError as err:
        if debug_requested():
            raise
        report(err)
    except (OSError, RuntimeError) as err:  # a full disk or a refused write anywhere: what and where, no traceback
        known = os_error(err)
        if known is None or debug_requested():
            raise
        report(known)


def reported(task):
    """Decorator for a Hydra task function: genflow errors raised inside the job exit 2 with the message
    instead of Hydra's ``Error executing job ... Traceback`` and exit 1."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        return exit_on_error(task, *args, **kwargs)

    return wrapper
