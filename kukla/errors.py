"""One exception type for every problem the user can fix.

The CLI prints a `KuklaError` as one line (no traceback), so its message must say
what went wrong and what to do about it.
"""


class KuklaError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ConfigError(KuklaError):
    """A configuration value is invalid; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message
