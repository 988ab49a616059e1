"""User-facing errors. Every mistake a user can make ends in one of these, worded as
what went wrong, why it matters, and how to fix it, and raised before any expensive work starts."""


class GenflowError(Exception):
    """Base class for genflow's own errors."""


class ConfigError(GenflowError, ValueError):
    """A configuration value, file or path is wrong or missing."""


class CheckpointError(GenflowError):
    """A checkpoint is missing, corrupt, foreign, or does not match the requested configuration."""


class TrainingDiverged(GenflowError, RuntimeError):
    """The loss became NaN or infinite."""


def config_error(what: str, why: str, fix: str) -> ConfigError:
    return ConfigError(f"{what}\n  why: {why}\n  fix: {fix}")


def exit_on_error(main, *args):
    """Run a command-line entry point: a genflow error ends the process with its message and exit
    status 2, without a traceback (the message already says what, why and how to fix)."""
    import sys

    try:
        return main(*args)
    except GenflowError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
