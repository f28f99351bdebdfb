"""Errors meant for the user: their message says what is wrong and what to do.

The command-line tools print them as one line (no traceback) and exit with 2.
"""


class OODDetError(Exception):
    """Base class of the project's user-facing errors."""


class ConfigError(OODDetError, ValueError):
    """A config file, key, value or dataset name that cannot be used."""


class DatasetError(OODDetError, RuntimeError):
    """A dataset that is missing, unreadable or malformed."""
