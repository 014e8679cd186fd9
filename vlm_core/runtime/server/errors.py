"""What a request can be refused for, named by what is wrong (not by HTTP status).

Request parsing, image handling and the worker raise these; `app.py` maps each type to an HTTP status
and OpenAI's error shape in one table. The scheduler's own errors (queue full, timeouts, cancelled)
live in `scheduler.py`, which knows nothing of HTTP.
"""
from __future__ import annotations


class RequestError(Exception):
    """The request is wrong and the client can fix it.

    Args:
        message: what is wrong and what to do, one line.
        param: the JSON field at fault, as a path (``messages[0].content[1].text``), or None.
        code: a stable machine-readable tag (``invalid_image``); the class's default when None.
    """

    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param
        self.code = code or type(self).code


class NotFound(RequestError):
    """No such route or model."""

    code = "not_found"


class MethodNotAllowed(RequestError):
    code = "method_not_allowed"


class PayloadTooLarge(RequestError):
    """The body (or a fetched image) is over the server's size limit."""

    code = "request_too_large"


class AuthError(RequestError):
    """Missing or wrong API key."""

    code = "invalid_api_key"
