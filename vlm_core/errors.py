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

    A subclass names its default code in its header: ``class NotFound(UserError, code="not_found")``.
    """

    code: str = "invalid_request"

    def __init_subclass__(cls, code: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)  # str(error) is the message
        self.param = param
        self.code = code or type(self).code


class ParameterError(UserError, ValueError, code="invalid_parameter"):
    """A value given for one parameter is unusable. Also a ValueError, so code that catches ValueError for bad
    arguments keeps working."""


class ModelFolderError(UserError, code="invalid_model_folder"):
    """The folder given as the model is not a complete exported model."""


class ContextLengthError(ParameterError, code="context_length_exceeded"):
    """The prompt plus the requested new tokens do not fit the model's context."""


# What only the server refuses (its front end maps each class to an HTTP status: server/app.py's ERRORS).
class NotFound(UserError, code="not_found"):
    """No such route or model."""


class MethodNotAllowed(UserError, code="method_not_allowed"):
    """The route exists, not for this HTTP method."""


class PayloadTooLarge(UserError, code="request_too_large"):
    """A body (or a fetched image) is over a size limit."""


class AuthError(UserError, code="invalid_api_key"):
    """Missing or wrong API key."""


class UnsupportedMediaType(UserError, code="unsupported_media_type"):
    """A request body that is not declared JSON (its Content-Type)."""


class RequestTimeout(UserError, code="request_timeout"):
    """The request body did not arrive within the server's deadline."""
