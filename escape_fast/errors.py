"""Every error escape_fast reports to a user, in one place.

A :class:`UserError` means bad input, not a bug: a command prints its
message as one line (``prog: error: ...``) and exits with code 2
(escape_fast.cli.run_main); anything else is a bug and keeps its traceback.
Each kind also derives from the built-in exception a Python caller would
catch for it (ValueError for bad values, RuntimeError for a missing
resource), so ``except ValueError`` around the API keeps working.

This module imports nothing of escape_fast, so that every other module may
import it.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "CacheError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DataWarning",
    "UsageError",
    "UserError",
    "WeightsUnavailable",
]


class UserError(Exception):
    """Bad input: reported as one line with exit code 2, never as a traceback."""


class UsageError(UserError, ValueError):
    """A command-line option or argument that cannot be used as given."""


class DataError(UserError, ValueError):
    """Bad dataset input; the message names the file and the offending id."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or weights file that cannot be used, with the reason and the file."""


class ConfigError(UserError, ValueError):
    """A setting that does not exist or has a value it cannot take."""


class CacheError(UserError, RuntimeError):
    """The cache folder cannot be written, or holds a damaged benchmark."""


class WeightsUnavailable(UserError, RuntimeError):
    """The trunk's pretrained weights are neither cached nor downloadable here."""


class BackendUnavailable(UserError, RuntimeError):
    """The requested op backend has no implementation for this op or device."""


class DataWarning(UserWarning):
    """Annotations or categories were skipped; the message counts them."""
