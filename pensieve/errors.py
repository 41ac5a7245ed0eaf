"""Errors that cross the library boundary, each carrying what an OpenAI-style error body needs."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pensieve.messages import ErrorInfo


class PensieveError(Exception):
    """Base error: `status` is the HTTP status the server answers with."""

    status: int = 500
    type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_openai(self) -> dict:
        """The OpenAI error body: {"error": {"message", "type", "param", "code"}}."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(PensieveError):
    status = 400
    type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    """Prompt plus max_tokens does not fit the model's context window."""

    def __init__(self, message: str, *, param: str | None = "messages"):
        super().__init__(message, param=param, code="context_length_exceeded")


class NotFoundError(PensieveError):
    status = 404
    type = "not_found_error"


class ConflictError(PensieveError):
    """The request conflicts with the server's state (another model's exported state; a
    conversation in use)."""

    status = 409
    type = "conflict_error"


class OverloadedError(PensieveError):
    """The bounded admission queue is full; the client should retry later."""

    status = 503
    type = "overloaded_error"

    def __init__(self, message: str, *, retry_after_s: float = 1.0):
        super().__init__(message, code="overloaded")
        self.retry_after_s = retry_after_s


class ModelLoadError(PensieveError):
    """A model folder or file is missing, malformed or of an unsupported architecture."""

    type = "model_load_error"


class EngineError(PensieveError):
    """An actor failed while serving this request; the engine keeps serving others."""

    type = "server_error"


def to_info(exc: Exception) -> ErrorInfo:
    """An exception as data that can travel in a message."""
    from pensieve.messages import ErrorInfo

    if isinstance(exc, PensieveError):
        return ErrorInfo(type(exc).__name__, exc.message, exc.param, exc.code)
    return ErrorInfo("EngineError", f"{type(exc).__name__}: {exc}")


def from_info(info: ErrorInfo) -> PensieveError:
    """The PensieveError an ErrorInfo describes."""
    kinds = {cls.__name__: cls for cls in _subclasses(PensieveError)}
    cls = kinds.get(info.kind, EngineError)
    if cls is ContextLengthError:
        return ContextLengthError(info.message, param=info.param)
    if cls is OverloadedError:
        return OverloadedError(info.message)
    return cls(info.message, param=info.param, code=info.code)


def _subclasses(cls: type) -> list[type]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _subclasses(sub)
    return out
