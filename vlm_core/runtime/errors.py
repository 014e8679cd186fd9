"""Errors a user can act on: the CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input (a file, a flag, a model folder): the message names it and says what to do."""


class ModelFolderError(UserError):
    """The folder given with -m is not a complete exported model."""


class ContextLengthError(UserError):
    """The prompt plus the requested new tokens do not fit the model's context."""


class ParameterError(UserError, ValueError):
    """A value passed to the Python API is unusable; `param` names the parameter as the caller wrote it
    (``messages``, ``max_new_tokens``, ``stop``), and so does the message. Also a ValueError, so code that
    catches ValueError for bad arguments keeps working."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
