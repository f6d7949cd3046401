"""The one base class for bad input: the CLI turns any subclass into one line on stderr and exit code 2."""


class InputError(ValueError):
    """Bad input from the user (arguments, files, data). The message is one line, shown as is."""
