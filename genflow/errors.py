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


def os_error(err: OSError, path=None) -> GenflowError | None:
    """A disk-full, read-only or permission ``OSError`` as ``error: what / why / fix`` naming the file; None
    for any other ``OSError`` (a bug or a failure genflow cannot explain)."""
    why = DISK_ERRNOS.get(err.errno)
    if why is None:
        return None
    where = path or err.filename or "a file"
    fix = ("free space on that disk (or write elsewhere), then run the same command again" if err.errno in
           (errno.ENOSPC, errno.EDQUOT) else "make that folder writable or choose another output folder, then run "
           "the same command again")
    return GenflowError(f"could not write {where}\n  why: {why} ({err.strerror or err})\n  fix: {fix}")


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
    except OSError as err:  # a full disk or a refused write anywhere: what and where, not a traceback
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
