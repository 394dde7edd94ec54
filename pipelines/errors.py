"""Errors the command line turns into one clear line and a non-zero exit."""


class UserError(Exception):
    """Bad input or options: the message names the input and says what to do."""


class RunCheckError(RuntimeError):
    """A finished run's counts do not add up: a runner lost or duplicated rows."""
