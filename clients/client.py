"""Typed Python client for adapter-server, sync (`AdapterServerClient`) and async
(`AsyncAdapterServerClient`), on httpx.

Both clients share everything except the transport: each operation is written once, in `Api`,
as a plan that yields `Call`s (method, path, body, and the parser of the answer into a
dataclass); the sync client performs them blocking, the async one awaits them. Server errors, which are
OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`), become `AdapterServerError`
subclasses chosen by HTTP status and carrying the server's message.
"""

from __future__ import annotations

import functools
import inspect
import io
import json
import os
import tarfile
import warnings
import zipfile
from urllib.parse import quote
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Generator, Iterable, Iterator, Sequence

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
# the client's own variables: the server reads ADAPTER_SERVER_* as its settings, so sharing one
# (an admin key exported for the client) would configure a server started in the same shell
URL_ENV = "ADAPTER_CLIENT_URL"
API_KEY_ENV = "ADAPTER_CLIENT_API_KEY"
ADMIN_KEY_ENV = "ADAPTER_CLIENT_ADMIN_KEY"
OLD_URL_ENV = "ADAPTER_SERVER_URL"  # still read (the server has no such setting)
OLD_API_KEY_ENV = "ADAPTER_SERVER_API_KEY"  # still read, with a deprecation warning: it is the server's inference key
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
UPLOAD_CHUNK = 256 * 1024
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz")

Progress = Callable[[int, int], None]  # (bytes sent, total bytes)


# ---------------------------------------------------------------------------- errors
class AdapterServerError(Exception):
    """Any failed call. `status` is the HTTP status (0 when no response came back)."""

    def __init__(self, status: int, message: str, type: str | None = None, code: str | int | None = None,
                 param: str | None = None):
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param


class BadRequest(AdapterServerError):
    """400 / 422: the server rejected the request or the adapter files."""


class AuthError(AdapterServerError):
    """401 / 403: missing or wrong API key."""


class NotFound(AdapterServerError):
    """404: no such adapter (or model)."""


class Conflict(AdapterServerError):
    """409: the name is taken, or the adapter cannot be merged in its state."""


class TooLarge(BadRequest):
    """413: the upload (or request body) is over the server's size limit."""


class RateLimited(AdapterServerError):
    """429: the server's queue is full; retry later."""


class ServerError(AdapterServerError):
    """5xx: the server failed."""


class ConnectionFailed(AdapterServerError):
    """No HTTP response: the server is unreachable or the connection broke."""


ERROR_BY_STATUS: dict[int, type[AdapterServerError]] = {
    400: BadRequest, 422: BadRequest, 413: TooLarge, 401: AuthError, 403: AuthError, 404: NotFound, 409: Conflict,
    429: RateLimited,
}

# error bodies inside a stream carry no status; their OpenAI type tells the class
STATUS_BY_TYPE = {"invalid_request_error": 400, "authentication_error": 401, "rate_limit_error": 429}


def error_from(status: int, body: Any) -> AdapterServerError:
    """The exception for an error response (status, decoded JSON body or raw text)."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        message, kind, code, param = str(err.get("message", "")), err.get("type"), err.get("code"), err.get("param")
    else:
        message, kind, code, param = (str(body) if body else f"HTTP {status}"), None, None, None
    cls = ERROR_BY_STATUS.get(status, ServerError if status >= 500 else AdapterServerError)
    return cls(status, message, kind, code, param)


def check(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    raise error_from(response.status_code, body)


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Logprobs:
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    finish_reason: str | None = None  # "stop" | "length" | None (a stream chunk before the end)
    logprobs: Logprobs | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class Completion:
    """A whole completion, or one stream chunk (then `choices` holds the new text only)."""

    id: str
    model: str
    created: int
    choices: list[Choice]
    usage: Usage | None = None

    @property
    def text(self) -> str:
        """The first choice's text (the usual single-prompt case)."""
        return self.choices[0].text if self.choices else ""


@dataclass(frozen=True)
class Model:
    id: str
    created: int
    owned_by: str
    parent: str | None = None  # adapters: the base model they run on


@dataclass(frozen=True)
class AdapterInfo:
    id: str
    format: str
    method: str
    parameters: int
    bytes: int
    location: str | None = None
    pinned: bool = False
    merged: bool = False
    requests_served: int = 0
    created: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # fields this client does not know yet


@dataclass(frozen=True)
class Deleted:
    id: str
    deleted: bool


@dataclass(frozen=True)
class MergeState:
    merged: str | None  # the adapter folded into the base weights, or None


@dataclass(frozen=True)
class Health:
    status: str
    model: str
    stats: dict[str, Any] = field(default_factory=dict)


def build(cls, data: dict) -> Any:
    """A dataclass from a JSON object, ignoring keys it does not declare (or keeping them in `extra`)."""
    names = {f.name for f in fields(cls)}
    known = {k: v for k, v in data.items() if k in names and k != "extra"}
    if "extra" in names:
        known["extra"] = {k: v for k, v in data.items() if k not in names and k != "object"}
    return cls(**known)


def parse_choice(data: dict) -> Choice:
    """A completion choice, or a chat one (`message` / stream `delta`: its content is the text)."""
    lp = data.get("logprobs")
    if "text" in data:
        text = data["text"]
    else:
        text = (data.get("message") or data.get("delta") or {}).get("content") or ""
    if lp and "content" in lp:  # chat's shape: one entry per token
        entries = lp["content"] or []
        lp = {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
              "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs", [])} for e in entries],
              "text_offset": []}
    return Choice(index=data.get("index", 0), text=text, finish_reason=data.get("finish_reason"),
                  logprobs=build(Logprobs, lp) if lp else None)


def parse_completion(data: dict) -> Completion:
    usage = data.get("usage")
    return Completion(id=data.get("id", ""), model=data.get("model", ""), created=data.get("created", 0),
                      choices=[parse_choice(c) for c in data.get("choices", [])],
                      usage=build(Usage, usage) if usage else None)


def parse_models(data: dict) -> list[Model]:
    return [build(Model, m) for m in data["data"]]


def parse_adapter(data: dict) -> AdapterInfo:
    return build(AdapterInfo, data)


def parse_adapters(data: dict) -> list[AdapterInfo]:
    return [parse_adapter(a) for a in data["data"]]


def parse_health(data: dict) -> Health:
    return Health(status=data.get("status", ""), model=data.get("model", ""),
                  stats={k: v for k, v in data.items() if k not in ("status", "model")})


def parse_sse_line(line: str) -> Completion | None:
    """One line of a completion stream: a chunk, None (blank, comment, [DONE]), or an error raised."""
    if not line.startswith("data:"):
        return None
    payload = line[len("data:"):].strip()
    if payload == "[DONE]" or not payload:
        return None
    data = json.loads(payload)
    if "error" in data:
        raise error_from(STATUS_BY_TYPE.get(data["error"].get("type"), 500), data)
    return parse_completion(data)


# ---------------------------------------------------------------------------- request bodies
def completion_body(prompt: str | Sequence[int] | Sequence[str], model: str, adapters: Sequence[str] | None,
                    stream: bool, params: dict[str, Any]) -> dict[str, Any]:
    return request_body({"prompt": prompt if isinstance(prompt, str) else list(prompt)}, model, adapters, stream, params)


def chat_body(messages: Sequence[dict[str, Any]], model: str, adapters: Sequence[str] | None, stream: bool,
              params: dict[str, Any]) -> dict[str, Any]:
    return request_body({"messages": list(messages)}, model, adapters, stream, params)


def request_body(input: dict[str, Any], model: str, adapters: Sequence[str] | None, stream: bool,
                 params: dict[str, Any]) -> dict[str, Any]:
    body = {"model": model, **input, "stream": stream}
    if adapters:
        body["adapters"] = list(adapters)
    body.update({k: v for k, v in params.items() if v is not None})
    return body


def adapter_files(directory: Path) -> list[tuple[str, Path]]:
    """(path relative to the adapter directory, file) for every file under it, sorted."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    if not files:
        raise ValueError(f"no files in adapter directory {directory}")
    return [(p.relative_to(directory).as_posix(), p) for p in files]


@dataclass(frozen=True)
class Upload:
    """A multipart body, built once: its size goes to the pre-check, its bytes are sent in chunks."""

    content: bytes
    content_type: str


def multipart_upload(name: str, path: str | os.PathLike, format: str | None) -> Upload:
    """The upload of an adapter directory (one `files` part per file, named by its relative
    path) or of one .zip/.tar.gz archive (an `archive` part)."""
    path = Path(path)
    data = {"name": name, **({"format": format} if format else {})}
    if path.is_dir():
        parts = [("files", (rel, p.read_bytes(), "application/octet-stream")) for rel, p in adapter_files(path)]
    elif path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES):
        parts = [("archive", (path.name, path.read_bytes(), "application/octet-stream"))]
    else:
        raise ValueError(f"{path} is neither an adapter directory nor a .zip/.tar.gz archive")
    request = httpx.Request("POST", "http://upload/", data=data, files=parts)
    return Upload(request.read(), request.headers["content-type"])


def skip_precheck(error: AdapterServerError) -> bool:
    """An older server without the check endpoint: upload without the pre-check."""
    return error.status in (404, 405) and error.code != "model_not_found"


def adapter_path(name: str, suffix: str = "") -> str:
    return f"/v1/adapters/{quote(name, safe='')}{suffix}"


def chunks(body: bytes, progress: Progress | None) -> Iterator[bytes]:
    total = len(body)
    for start in range(0, total, UPLOAD_CHUNK):
        piece = body[start:start + UPLOAD_CHUNK]
        yield piece
        if progress:
            progress(start + len(piece), total)


async def achunks(body: bytes, progress: Progress | None) -> AsyncIterator[bytes]:
    for piece in chunks(body, progress):
        yield piece


def pack_directory(directory: str | os.PathLike, archive: str | os.PathLike) -> Path:
    """Write an adapter directory as a .zip or .tar.gz (by the archive's suffix) for `upload_adapter`."""
    directory, archive = Path(directory), Path(archive)
    files = adapter_files(directory)
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
            for rel, p in files:
                z.write(p, rel)
    else:
        with tarfile.open(archive, "w:gz") as t:
            for rel, p in files:
                t.add(p, rel)
    return archive


def unpack_zip(content: bytes, dest: str | os.PathLike) -> Path:
    """Extract a downloaded adapter zip into `dest`, refusing paths that leave it."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    with zipfile.ZipFile(io.BytesIO(content)) as z:
        for member in z.namelist():
            if not (root / member).resolve().is_relative_to(root):
                raise ValueError(f"refusing to extract {member!r} outside {dest}")
        z.extractall(dest)
    return dest


# ---------------------------------------------------------------------------- the clients
def env_api_key() -> str | None:
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV]
    if os.environ.get(OLD_API_KEY_ENV):
        warnings.warn(f"${OLD_API_KEY_ENV} is the server's inference key setting; give the client its key in "
                      f"${API_KEY_ENV} (or ${ADMIN_KEY_ENV} for the admin key)", DeprecationWarning, stacklevel=4)
        return os.environ[OLD_API_KEY_ENV]
    return None


def client_keys(api_key: str | None, admin_key: str | None) -> tuple[str | None, str | None]:
    """(inference key, admin key): the arguments, else $ADAPTER_CLIENT_API_KEY (then the old
    $ADAPTER_SERVER_API_KEY) and $ADAPTER_CLIENT_ADMIN_KEY."""
    return (api_key if api_key is not None else env_api_key(),
            admin_key if admin_key is not None else os.environ.get(ADMIN_KEY_ENV) or None)


def client_options(base_url: str | None, api_key: str | None, timeout: float | httpx.Timeout | None) -> dict:
    """`api_key` is the key every call sends (admin calls may send the admin key instead)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = (base_url or os.environ.get(URL_ENV) or os.environ.get(OLD_URL_ENV) or DEFAULT_URL).rstrip("/")
    return {"base_url": url, "headers": headers, "timeout": DEFAULT_TIMEOUT if timeout is None else timeout}


def admin_headers(admin_key: str | None) -> dict:
    return {"Authorization": f"Bearer {admin_key}"} if admin_key else {}


def base_model(models: Iterable[Model]) -> str:
    for m in models:
        if m.parent is None:
            return m.id
    raise ServerError(500, "the server lists no base model")


# ---------------------------------------------------------------------------- the API, described once
def json_as(parse: Callable[[Any], Any]) -> Callable[[httpx.Response], Any]:
    return lambda response: parse(response.json())


@dataclass(frozen=True)
class Call:
    """One HTTP call of the API: what goes out, and how the answer is read. Both clients send
    these; they differ only in how (blocking or awaited)."""

    method: str
    path: str
    json: dict | None = None
    parse: Callable[[httpx.Response], Any] = lambda response: response.json()
    admin: bool = False  # sends the admin key (when the client has one)
    params: dict | None = None
    upload: Upload | None = None  # a multipart body, sent in chunks that report `progress`
    progress: Progress | None = None
    stream: bool = False  # server-sent events: the result is the parsed chunks, as they come


def call(method: str, path: str, parse: Callable[[Any], Any], json: dict | None = None, admin: bool = False) -> Call:
    return Call(method, path, json, json_as(parse), admin)


class Api:
    """Every operation of the API, written once as a plan: a generator that yields `Call`s and
    gets each one's result back (or its error thrown in). `AdapterServerClient` runs the plans
    blocking, `AsyncAdapterServerClient` awaits them; `with_api` gives each client one method
    per plan, with the plan's signature and docstring."""

    _base: str | None

    # -- server
    def health(self) -> Health:
        return (yield call("GET", "/health", parse_health))

    def models(self) -> list[Model]:
        return (yield call("GET", "/v1/models", parse_models))

    def base_model(self) -> str:
        """The base model's name (asked once, then remembered)."""
        if self._base is None:
            self._base = base_model((yield from Api.models(self)))
        return self._base

    # -- completions
    def complete(self, prompt: str | Sequence[int] | Sequence[str], model: str | None = None,
                 adapters: Sequence[str] | None = None, **params: Any) -> Completion:
        """One completion. `model` is the base model or an adapter name (default: the base);
        `adapters` a stack applied in order; `params` any OpenAI completion field
        (max_tokens, temperature, top_p, top_k, seed, stop, logprobs, echo, ...)."""
        body = completion_body(prompt, model or (yield from Api.base_model(self)), adapters, False, params)
        return (yield call("POST", "/v1/completions", parse_completion, body))

    def stream(self, prompt: str | Sequence[int] | Sequence[str], model: str | None = None,
               adapters: Sequence[str] | None = None, **params: Any) -> Iterator[Completion]:
        """The completion as chunks, as the server produces them (server-sent events)."""
        body = completion_body(prompt, model or (yield from Api.base_model(self)), adapters, True, params)
        return (yield Call("POST", "/v1/completions", body, stream=True))

    def chat(self, messages: Sequence[dict[str, Any]], model: str | None = None, adapters: Sequence[str] | None = None,
             **params: Any) -> Completion:
        """A chat completion: `messages` ({"role", "content"} dicts) through the base model's chat
        template; `.text` is the assistant's reply. `params`: any chat field (max_tokens,
        temperature, n, seed, logprobs, top_logprobs, ...)."""
        body = chat_body(messages, model or (yield from Api.base_model(self)), adapters, False, params)
        return (yield call("POST", "/v1/chat/completions", parse_completion, body))

    def chat_stream(self, messages: Sequence[dict[str, Any]], model: str | None = None,
                    adapters: Sequence[str] | None = None, **params: Any) -> Iterator[Completion]:
        """The chat reply as chunks (each choice's `text` is the new content)."""
        body = chat_body(messages, model or (yield from Api.base_model(self)), adapters, True, params)
        return (yield Call("POST", "/v1/chat/completions", body, stream=True))

    # -- adapters
    def upload_adapter(self, name: str, path: str | os.PathLike, format: str | None = None,
                       progress: Progress | None = None) -> AdapterInfo:
        """Upload an adapter directory as saved by AdapterHub `save_adapter` or PEFT
        `save_pretrained` (or a .zip/.tar.gz of one). `format` is "adapterhub" | "peft" | None
        (detected); `progress(sent, total)` is called as the body goes out. The name also goes
        in the query, so that the server refuses a bad or taken name before reading the body."""
        upload = multipart_upload(name, path, format)
        try:  # ask first: a body the server would refuse (name taken, too large) is never sent
            yield call("POST", "/v1/adapters/check", dict, {"name": name, "bytes": len(upload.content)}, admin=True)
        except AdapterServerError as e:
            if not skip_precheck(e):
                raise
        return (yield Call("POST", "/v1/adapters", parse=json_as(parse_adapter), admin=True, params={"name": name},
                           upload=upload, progress=progress))

    def register_adapter(self, name: str, path: str, format: str | None = None) -> AdapterInfo:
        """Add an adapter from a directory on the *server's* file system."""
        body = {"name": name, "path": path, **({"format": format} if format else {})}
        return (yield call("POST", "/v1/adapters/register", parse_adapter, body, admin=True))

    def list_adapters(self) -> list[AdapterInfo]:
        return (yield call("GET", "/v1/adapters", parse_adapters))

    def get_adapter(self, name: str) -> AdapterInfo:
        return (yield call("GET", adapter_path(name), parse_adapter))

    def download_adapter(self, name: str, dest: str | os.PathLike) -> Path:
        """The adapter's files, extracted into directory `dest`."""
        return (yield Call("GET", adapter_path(name, "/files"), parse=lambda r: unpack_zip(r.content, dest)))

    def delete_adapter(self, name: str) -> Deleted:
        return (yield call("DELETE", adapter_path(name), lambda data: build(Deleted, data), admin=True))

    # -- merge
    def merged(self) -> MergeState:
        return (yield call("GET", "/v1/merge", lambda data: build(MergeState, data)))

    def merge(self, adapter: str) -> MergeState:
        """Fold a LoRA-family or (IA)^3 adapter into the base weights (Conflict if it cannot)."""
        return (yield call("POST", "/v1/merge", lambda data: build(MergeState, data), {"adapter": adapter}, admin=True))

    def reset(self) -> MergeState:
        """Restore the original base weights."""
        return (yield call("POST", "/v1/merge/reset", lambda data: build(MergeState, data), admin=True))


PLANS = {name: plan for name, plan in vars(Api).items() if inspect.isgeneratorfunction(plan)}
STREAMS = ("stream", "chat_stream")  # plans whose result is an iterator of chunks


Plan = Generator[Call, Any, Any]


def advance(plan: Plan, value: Any, error: AdapterServerError | None) -> tuple[bool, Any]:
    """Give the plan its last call's result (or throw in its error): (True, the plan's result)
    when it is done, else (False, its next call)."""
    try:
        return False, plan.throw(error) if error else plan.send(value)
    except StopIteration as done:
        return True, done.value


def run_plan(plan: Plan, perform: Callable[[Call], Any]) -> Any:
    """Run a plan, performing each call blocking; a failed call's error is thrown into the plan."""
    done, step = advance(plan, None, None)
    while not done:
        try:
            result = perform(step)
        except AdapterServerError as e:
            done, step = advance(plan, None, e)
        else:
            done, step = advance(plan, result, None)
    return step


async def arun_plan(plan: Plan, perform: Callable[[Call], Awaitable[Any]]) -> Any:
    """`run_plan`, each call awaited."""
    done, step = advance(plan, None, None)
    while not done:
        try:
            result = await perform(step)
        except AdapterServerError as e:
            done, step = advance(plan, None, e)
        else:
            done, step = advance(plan, result, None)
    return step


def with_api(asynchronous: bool):
    """Class decorator: one method per `Api` plan, run by the class's `_perform`."""

    def sync_method(name, plan):
        if name in STREAMS:
            def method(self, *args, **kwargs):
                yield from run_plan(plan(self, *args, **kwargs), self._perform)
        else:
            def method(self, *args, **kwargs):
                return run_plan(plan(self, *args, **kwargs), self._perform)
        return method

    def async_method(name, plan):
        if name in STREAMS:
            async def method(self, *args, **kwargs):
                async for chunk in await arun_plan(plan(self, *args, **kwargs), self._perform):
                    yield chunk
        else:
            async def method(self, *args, **kwargs):
                return await arun_plan(plan(self, *args, **kwargs), self._perform)
        return method

    def decorate(cls):
        for name, plan in PLANS.items():
            setattr(cls, name, functools.wraps(plan)((async_method if asynchronous else sync_method)(name, plan)))
        return cls

    return decorate


class Connection:
    """What both clients hold: the httpx client (with the URL and the key every call sends),
    the admin key, and the base model's name once asked."""

    def __init__(self, http_class, base_url, api_key, timeout, transport, admin_key):
        api_key, self.admin_key = client_keys(api_key, admin_key)
        self.http = http_class(**client_options(base_url, api_key or self.admin_key, timeout), transport=transport)
        self._base: str | None = None

    @property
    def base_url(self) -> str:
        return str(self.http.base_url).rstrip("/")


@with_api(asynchronous=False)
class AdapterServerClient(Connection):
    """Blocking client. `base_url` defaults to $ADAPTER_CLIENT_URL, then http://127.0.0.1:8000;
    `api_key` to $ADAPTER_CLIENT_API_KEY and `admin_key` to $ADAPTER_CLIENT_ADMIN_KEY. Admin
    calls (upload, register, delete, merge, reset) send the admin key when there is one, every
    other call the inference key (or the admin key if that is the only one). Use as a context
    manager, or call `close()`. Its API methods are `Api`'s."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = None, transport: httpx.BaseTransport | None = None,
                 admin_key: str | None = None):
        super().__init__(httpx.Client, base_url, api_key, timeout, transport, admin_key)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "AdapterServerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _perform(self, call: Call) -> Any:
        content = chunks(call.upload.content, call.progress) if call.upload else None
        try:
            response = self.http.send(build_request(self.http, call, self.admin_key, content), stream=call.stream)
        except httpx.TransportError as e:
            raise ConnectionFailed(0, f"cannot reach {self.base_url}: {e}", "connection_error") from e
        if call.stream and not response.is_success:
            response.read()
            response.close()
        check(response)
        return self._events(response) if call.stream else call.parse(response)

    def _events(self, response: httpx.Response) -> Iterator[Completion]:
        try:
            for line in response.iter_lines():
                chunk = parse_sse_line(line)
                if chunk is not None:
                    yield chunk
        except httpx.TransportError as e:
            raise ConnectionFailed(0, f"stream from {self.base_url} broke: {e}", "connection_error") from e
        finally:
            response.close()


@with_api(asynchronous=True)
class AsyncAdapterServerClient(Connection):
    """The same API as `AdapterServerClient`, every call awaitable; `stream` is an async iterator."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = None, transport: httpx.AsyncBaseTransport | None = None,
                 admin_key: str | None = None):
        super().__init__(httpx.AsyncClient, base_url, api_key, timeout, transport, admin_key)

    async def close(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> "AsyncAdapterServerClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _perform(self, call: Call) -> Any:
        content = achunks(call.upload.content, call.progress) if call.upload else None
        try:
            response = await self.http.send(build_request(self.http, call, self.admin_key, content), stream=call.stream)
        except httpx.TransportError as e:
            raise ConnectionFailed(0, f"cannot reach {self.base_url}: {e}", "connection_error") from e
        if call.stream and not response.is_success:
            await response.aread()
            await response.aclose()
        check(response)
        return self._events(response) if call.stream else call.parse(response)

    async def _events(self, response: httpx.Response) -> AsyncIterator[Completion]:
        try:
            async for line in response.aiter_lines():
                chunk = parse_sse_line(line)
                if chunk is not None:
                    yield chunk
        except httpx.TransportError as e:
            raise ConnectionFailed(0, f"stream from {self.base_url} broke: {e}", "connection_error") from e
        finally:
            await response.aclose()


def build_request(http: httpx.Client | httpx.AsyncClient, call: Call, admin_key: str | None, content) -> httpx.Request:
    """The request of `call`: the admin key for admin calls; an upload's multipart type and
    size, its bytes sent as `content` (chunks that report progress)."""
    headers = admin_headers(admin_key) if call.admin else {}
    if call.upload:
        headers.update({"content-type": call.upload.content_type, "content-length": str(len(call.upload.content))})
    return http.build_request(call.method, call.path, json=call.json, params=call.params, content=content,
                              headers=headers or None)
