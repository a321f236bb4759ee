"""The one error channel of the library.

Library code raises subclasses of :class:`GuardError`; the server maps them to OpenAI error JSON
in exactly one place (``server.errors``) and the CLI prints ``str(error)``. Each class fixes the
HTTP status and the OpenAI error ``type`` so nothing downstream has to guess.
"""

from __future__ import annotations


class GuardError(Exception):
    """Base class. ``param`` names the offending request parameter or policy field, if any."""

    status_code: int = 500
    error_type: str = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequestError(GuardError):
    """The request is malformed or a value is out of range (HTTP 400)."""

    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested tokens do not fit in the model's context window."""

    code = "context_length_exceeded"


class RequestTooLargeError(InvalidRequestError):
    """The request exceeds a server limit on its size (HTTP 413)."""

    status_code = 413
    code = "request_too_large"


class NotFoundError(GuardError):
    """An unknown model or log record (HTTP 404)."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class AuthenticationError(GuardError):
    """Missing or wrong API key (HTTP 401)."""

    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PolicyError(GuardError):
    """A policy file is invalid. ``errors`` holds one line per problem (file:line:col: field: msg)."""

    status_code = 500
    error_type = "policy_error"

    def __init__(self, path: str, errors: list[str]):
        self.path = path
        self.errors = list(errors)
        super().__init__(f"invalid policy {path}:\n" + "\n".join(f"  {e}" for e in self.errors))


class ModelLoadError(GuardError):
    """A model, tokenizer, probe or other artefact could not be loaded from disk."""

    status_code = 500
    error_type = "model_load_error"


class EngineError(GuardError):
    """The engine failed while generating (HTTP 500, reported as an error event on streams)."""

    status_code = 500
    error_type = "engine_error"


class OverloadedError(GuardError):
    """The engine queue is full (HTTP 503)."""

    status_code = 503
    error_type = "server_overloaded"


class UnavailableError(GuardError):
    """This replica is shutting down (HTTP 503, with ``Retry-After``): the request belongs on another."""

    status_code = 503
    error_type = "service_unavailable"
