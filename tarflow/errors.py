"""The one exception type for bad user input; the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input a user can fix: the message names the problem (and, where it helps, the fix)."""

