"""The one exception type that commands turn into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user (config, CLI, data files): reported in one line, no traceback."""
