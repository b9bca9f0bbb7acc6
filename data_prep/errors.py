"""The one error type the CLI turns into a one-line message and exit status 2 (bad usage or input)."""


class UsageError(Exception):
    """The user asked for something that cannot be done: a missing path, a bad flag value, ..."""
