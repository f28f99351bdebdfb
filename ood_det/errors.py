"""Errors meant for the user: their message says what is wrong and what to do.

The command-line tools print them as one line (no traceback) and exit with 2.
"""


class OODDetError(Exception):
    """Base class of the project's user-facing errors."""


class ConfigError(OODDetError, ValueError):
    """A config file, key, value or dataset name that cannot be used."""


class DatasetError(OODDetError, RuntimeError):
    """A dataset that is missing, unreadable or malformed."""


def one_line(e: BaseException, limit: int = 400) -> str:
    """The message of ``e`` on one line, at most ``limit`` characters.

    A KeyError's message is its argument, not its repr; an error re-raised from a
    data-loader worker (torch puts the worker's traceback into the message) gives the
    worker's original message.
    """
    text = str(e.args[0]) if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
    marker = f"{type(e).__name__}: "
    if "Original Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1]
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
