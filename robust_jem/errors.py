"""Bad input on the model side: the CLI turns it into one line on stderr and exit code 2."""

from infra.errors import InputError


class UserError(InputError):
    """Bad input from the user (arguments, files, data). The message is one line, shown as is."""


class TrainingDiverged(RuntimeError):
    """JEM training diverged more often than ``max_retries`` allows."""


class AnotherRun(UserError):
    """A run folder already holds a run of another configuration (never started over silently)."""
