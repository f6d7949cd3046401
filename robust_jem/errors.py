"""The one exception type for bad input: the CLI turns it into one line on stderr and exit code 2."""


class UserError(Exception):
    """Bad input from the user (arguments, files, data). The message is one line, shown as is."""
