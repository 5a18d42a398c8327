"""The one exception type for bad user input: the CLI prints its message and exits non-zero."""


class UserError(Exception):
    """Bad input: the message names the flag or file at fault and how to fix it."""
