"""Errors a user can act on: the CLI prints their message as one line, without a traceback."""


class UserError(Exception):
    """A problem with the user's input (config, model, data, arguments)."""


class UnsafeModelError(UserError):
    """The model would run arbitrary code when loaded (Lambda layers, custom objects)."""


class SkipInput(Exception):
    """One input cannot be used; it is recorded in ``skipped.csv`` with ``reason``."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason
