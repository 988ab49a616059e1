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
