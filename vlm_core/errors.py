"""The one error tree: every mistake a user can fix is a UserError carrying what to say, the parameter at
fault and a stable code. Front ends map it in one place each: the CLI prints `error: <message>` and exits 2
(vlm_core/runtime/generate.py, vlm_core/runtime/server/cli.py); the server answers OpenAI's error shape with
the status its class maps to (vlm_core/runtime/server/app.py, `ERRORS`).

Every layer raises these (kernels and models included), so nothing translates one error type into another.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input the caller can fix.

    Args:
        message: what is wrong and what to do, one line, naming the input the way the caller wrote it.
        param: the parameter at fault (an API argument such as ``max_new_tokens``, a JSON path such as
            ``messages[0].content[1]``, or a CLI flag), or None.
        code: a stable machine-readable tag (``invalid_image``); the class's `code` when None.
    """

    code: str = "invalid_request"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)  # str(error) is the message
        self.param = param
        self.code = code or type(self).code


class ParameterError(UserError, ValueError):
    """A value given for one parameter is unusable. Also a ValueError, so code that catches ValueError for bad
    arguments keeps working."""

    code = "invalid_parameter"


class ModelFolderError(UserError):
    """The folder given as the model is not a complete exported model."""

    code = "invalid_model_folder"


class ContextLengthError(ParameterError):
    """The prompt plus the requested new tokens do not fit the model's context."""

    code = "context_length_exceeded"


class NotFound(UserError):
    """No such route or model."""

    code = "not_found"


class MethodNotAllowed(UserError):
    code = "method_not_allowed"


class PayloadTooLarge(UserError):
    """A body (or a fetched image) is over a size limit."""

    code = "request_too_large"


class AuthError(UserError):
    """Missing or wrong API key."""

    code = "invalid_api_key"
