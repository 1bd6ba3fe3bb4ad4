"""Errors a user can act on: the CLI prints their message as one line, without a traceback."""


def first_line(exc, limit=200) -> str:
    """The gist of an exception for a one-line message: its first non-empty line (the type's name
    when it has none), cut to ``limit`` characters with "..." when longer."""
    text = getattr(exc, "message", None) or str(exc)
    line = next((l.strip() for l in text.splitlines() if l.strip()), type(exc).__name__)
    return line if len(line) <= limit else line[:limit - 3] + "..."


class UserError(Exception):
    """A problem with the user's input (config, model, data, arguments)."""


class UnsafeModelError(UserError):
    """The model would run arbitrary code when loaded (Lambda layers, custom objects)."""


class SkipInput(Exception):
    """One input cannot be used; it is recorded in ``skipped.csv`` with ``reason``."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason
