"""The one exception type for unusable user input (exit code 2, one clear line)."""


class UserError(Exception):
    """Bad input: a config, checkpoint, image or command-line value the tool cannot use.

    The message names the problem and the fix.  The CLI prints it as one line and exits 2.
    """

    exit_code = 2


class TrainingStopped(Exception):
    """Training cannot go on (e.g. too many non-finite steps).  CLI exit code 1."""

    exit_code = 1
