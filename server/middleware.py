"""One pure ASGI middleware for every HTTP request: a request id (taken from a sane incoming
`X-Request-ID` or made up) in the logs and in the response's `X-Request-ID` header, the
body-size limit of JSON endpoints, and the latency/count metrics. Plus the logging setup
whose lines carry that request id (text or JSON lines)."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid

from adapter_runtime.errors import PayloadTooLarge

from . import errors

HEADER = "x-request-id"
SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
UPLOAD = ("POST", "/v1/adapters")  # multipart uploads have their own limit, max_upload_bytes

# the request id of the request being handled in this context (asyncio task / copied to threads)
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
access_log = logging.getLogger("server.access")


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    for key, value in headers:
        if key.lower() == HEADER.encode():
            candidate = value.decode("latin-1").strip()
            if SAFE_ID.match(candidate):
                return candidate
    return uuid.uuid4().hex


def route_of(scope: dict) -> str:
    """The matched route's template (bounded label values), never the raw path."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class RequestContext:
    """ASGI middleware; `metrics` and `max_body_bytes` come from the app that installs it."""

    def __init__(self, app, metrics, max_body_bytes: int | None):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_id_of(scope.get("headers", []))
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER.encode()]
                message = {**message, "headers": [*headers, (HEADER.encode(), rid.encode())]}
            await send(message)

        try:
            receive = await self._limited_body(scope, receive, send_with_id)
            if receive is not None:
                await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            route = route_of(scope)
            self.metrics.http_done(scope["method"], route, status, seconds)
            access_log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status, seconds * 1e3)
            request_id_var.reset(token)

    async def _limited_body(self, scope, receive, send):
        """Read a JSON body up front, refusing it (413) past `max_body_bytes`; returns the
        `receive` the app should use, or None when the answer was already sent."""
        limit = self.max_body_bytes
        if limit is None or scope["method"] not in ("POST", "PUT", "PATCH") or (scope["method"], scope["path"]) == UPLOAD:
            return receive
        for key, value in scope.get("headers", []):
            if key.lower() == b"content-length" and value.isdigit() and int(value) > limit:
                await self._too_large(send, int(value), limit)
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return _replay([message], receive)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await self._too_large(send, size, limit, at_least=True)
                return None
            if not message.get("more_body", False):
                break
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive)

    @staticmethod
    async def _too_large(send, size: int, limit: int, at_least: bool = False) -> None:
        status, body = errors.describe(PayloadTooLarge(
            f"the request body is {'over ' if at_least else ''}{size} bytes, over max_body_bytes={limit}"))
        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


def _replay(messages: list[dict], receive):
    """A `receive` that first returns `messages`, then defers to the real one (disconnects)."""
    pending = list(messages)

    async def replay():
        return pending.pop(0) if pending else await receive()

    return replay


# ---------------------------------------------------------------------- logging
class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                "request_id": getattr(record, "request_id", "-"), "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def configure_logging(level: str, fmt: str = "text") -> None:
    """Root logging to stderr; every line carries the request id ("-" outside a request)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
