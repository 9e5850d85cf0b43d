"""The one place where engine errors become HTTP responses, in OpenAI's error shape:
{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from adapter_runtime import errors as E

log = logging.getLogger(__name__)

# error class -> (HTTP status, OpenAI error type, code); the first matching base class wins
STATUS: list[tuple[type[Exception], int, str, str | None]] = [
    (E.InvalidRequest, 400, "invalid_request_error", None),
    (E.AdapterNotFound, 404, "invalid_request_error", "model_not_found"),
    (E.AdapterFormatError, 422, "invalid_request_error", "adapter_format"),
    (E.AdapterUnsupported, 422, "invalid_request_error", "adapter_unsupported"),
    (E.AdapterIncompatible, 422, "invalid_request_error", "adapter_incompatible"),
    (E.NumericOverflow, 422, "invalid_request_error", "numeric_overflow"),
    (E.AdapterConflict, 409, "invalid_request_error", "conflict"),
    (E.PayloadTooLarge, 413, "invalid_request_error", "payload_too_large"),
    (E.Unauthorized, 401, "authentication_error", "invalid_api_key"),
    (E.Forbidden, 403, "permission_error", "forbidden"),
    (E.CapacityExceeded, 429, "rate_limit_error", "queue_full"),
    (E.EngineUnavailable, 503, "service_unavailable", "engine_unavailable"),
    (E.ModelLoadError, 500, "server_error", "model_load_error"),
    (E.AdapterRuntimeError, 500, "server_error", None),
]


MAX_MESSAGE = 2000  # characters; longer messages (echoing client input) are cut


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    # lone surrogates (client input such as "\ud800") cannot be encoded as UTF-8: escape them
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + f"... ({len(message)} characters)"
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def describe(error: Exception) -> tuple[int, dict]:
    """(status, body) for any exception; unknown ones are 500 without internals."""
    for cls, status, kind, code in STATUS:
        if isinstance(error, cls):
            return status, error_body(str(error), kind, getattr(error, "param", None), code)
    return 500, error_body("internal server error", "server_error")


def install(app: FastAPI) -> None:
    @app.exception_handler(E.AdapterRuntimeError)
    async def runtime_error(request: Request, exc: E.AdapterRuntimeError) -> JSONResponse:
        status, body = describe(exc)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        invalid = [e for e in exc.errors() if e.get("type") == "json_invalid"]
        if invalid:  # loc is ("body", character offset): not a parameter name
            ctx = invalid[0].get("ctx") or {}
            where = invalid[0].get("loc", ())[-1] if invalid[0].get("loc") else "?"
            detail = f": {ctx['error']}" if isinstance(ctx.get("error"), str) else ""
            return JSONResponse(error_body(f"the request body is not valid JSON (at character {where}{detail})",
                                           "invalid_request_error"), status_code=400)
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse(error_body(message or "invalid request", "invalid_request_error", ".".join(loc) or None),
                            status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind, None, exc.status_code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = request.scope.get("state", {}).get("request_id")  # outermost handler: set the header here
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc,
                  extra={"request_id": rid or "-"})  # the details stay in the log, keyed by the request id
        status, body = describe(exc)
        if status == 500 and rid:
            body["error"]["message"] += f" (request {rid}; the server log has the details)"
        return JSONResponse(body, status_code=status, headers={"X-Request-ID": rid} if rid else None)
