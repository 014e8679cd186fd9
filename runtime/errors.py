"""Errors a user can act on: the CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input (a file, a flag, a model folder): the message names it and says what to do."""


class ModelFolderError(UserError):
    """The folder given with -m is not a complete exported model."""


class ContextLengthError(UserError):
    """The prompt plus the requested new tokens do not fit the model's context."""
