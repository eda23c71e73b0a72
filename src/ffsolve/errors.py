"""User-facing errors: the command line prints these as one line and exits non-zero."""

__all__ = [
    "FFSolveError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "DivergedError",
    "Terminated",
]


class FFSolveError(Exception):
    """Base of errors caused by the user's input (files, configs, options)."""


class ConfigError(FFSolveError, ValueError):
    """A config file or override names an unknown field or has a bad value."""


class DataError(FFSolveError, FileNotFoundError):
    """A data set is missing or malformed; the message says how to get it."""


class CheckpointError(FFSolveError, ValueError):
    """A checkpoint is missing, corrupted, or of the wrong kind or version."""


class DivergedError(FFSolveError, FloatingPointError):
    """Training produced a non-finite loss or weight; nothing broken was saved."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the signal lands: the run stops as on Ctrl-C (cleans up, says
    so), and the command line exits 143 (128 + 15) where Ctrl-C's SIGINT gives 130."""
