"""Typed domain errors. `server/errors.py` maps each to one HTTP status, in one place."""


class AdapterRuntimeError(Exception):
    """Base class: every error the engine raises on purpose."""


class InvalidRequest(AdapterRuntimeError):
    """The request itself is malformed or out of bounds (400); `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class AdapterNotFound(AdapterRuntimeError):
    """A request names an adapter that is not registered (404)."""


class AdapterFormatError(AdapterRuntimeError):
    """An adapter directory is unreadable: missing file, bad JSON, unsafe pickle (422)."""


class AdapterUnsupported(AdapterRuntimeError):
    """A valid adapter uses a method or option this server does not implement (422)."""


class AdapterIncompatible(AdapterRuntimeError):
    """An adapter does not fit the loaded base model: model type, sizes, shapes (422)."""


class AdapterConflict(AdapterRuntimeError):
    """The operation conflicts with the adapter's state: duplicate name, cannot merge (409)."""


class NumericOverflow(AdapterRuntimeError):
    """An adapter's finite but huge weights overflow the model's number format (422): a request
    whose logits come out NaN or infinite fails alone (the others in its batch go on); a merge
    that would make base weights non-finite is refused before any weight changes."""


class CapacityExceeded(AdapterRuntimeError):
    """The queue or another bounded resource is full; retry later (429)."""


class EngineUnavailable(AdapterRuntimeError):
    """The engine is shutting down or has failed (503)."""


class ModelLoadError(AdapterRuntimeError):
    """The base model checkpoint cannot be loaded."""


class PayloadTooLarge(AdapterRuntimeError):
    """An upload (or one file of it) is over the configured size limit (413)."""


class Unauthorized(AdapterRuntimeError):
    """No API key, or a wrong one (401)."""


class Forbidden(AdapterRuntimeError):
    """A valid key without the right to do this, or a disabled operation (403)."""


def brief(value, limit: int = 80) -> str:
    """`repr(value)` cut to about `limit` characters, for messages that echo client input
    (a 1 MB model name must not come back in the error)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
