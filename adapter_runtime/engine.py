"""The engine: one frozen base model, a slotted KV cache and one worker thread.

Each step of the worker loop:
  1. drop cancelled requests (their KV slots are freed at once);
  2. admit waiting requests while a slot is free: write their prefix-tuning entries, prefill
     the prompt (one request per forward) and emit the first token;
  3. one batched decode forward (one token per running request, S=1) and emit its tokens.
Requests join between steps and leave as soon as they finish. The HTTP side only calls
`submit` and reads the handle's events; all torch work happens on the worker thread.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Iterator, Sequence

import torch
from torch import Tensor

from . import layout, sampling
from .batch import ForwardBatch, Setup, build_adapter_batch
from .errors import AdapterRuntimeError, CapacityExceeded, EngineUnavailable, InvalidRequest
from .models import LoadedModel
from .models.common import KVCache
from .registry import AdapterRegistry
from .sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 32  # KV slots = requests decoded together
    max_seq_len: int | None = None  # cache entries per slot (prefix + prompt + completion); None = model max
    max_queue: int = 256  # requests waiting for a slot before `submit` refuses (429)
    default_max_seq_len: int = 4096  # cap when max_seq_len is None and the model allows more


@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    params: SamplingParams = SamplingParams()
    setup: Setup = ()  # adapters, in stack order; () = the base model
    request_id: str = ""


@dataclass(frozen=True)
class TokenLogprob:
    """One entry of OpenAI's legacy `logprobs` object."""

    token: str
    logprob: float | None  # None for the first prompt token (nothing predicts it)
    top: dict[str, float] | None
    offset: int  # character offset of the token in the returned text


@dataclass(frozen=True)
class Event:
    """A piece of one request's output. The last event has `finish_reason` (or `error`)."""

    text: str = ""
    token_ids: tuple[int, ...] = ()  # generated tokens in this event
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: AdapterRuntimeError | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None


def collect(events: Sequence[Event], with_logprobs: bool) -> Completion:
    """Fold a finished request's events into one `Completion`; raise its error, if any."""
    for e in events:
        if e.error is not None:
            raise e.error
    last = events[-1]
    return Completion(
        text="".join(e.text for e in events),
        token_ids=tuple(t for e in events for t in e.token_ids),
        finish_reason=last.finish_reason or "stop",
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        logprobs=tuple(lp for e in events for lp in e.logprobs) if with_logprobs else None,
    )


class RequestHandle:
    """What `submit` returns. Events arrive from the worker thread; read them either from
    asyncio (`async for event in handle`, when submitted inside a running loop) or blocking
    (`handle.events()` / `handle.result()`, when submitted outside one)."""

    def __init__(self, request: Request):
        self.request = request
        self._cancelled = threading.Event()
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._queue: asyncio.Queue | queue.Queue = asyncio.Queue()
        except RuntimeError:
            self._loop = None
            self._queue = queue.Queue()

    def cancel(self) -> None:
        """Stop generating; the request leaves the batch (and frees its slot) at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _push(self, event: Event) -> None:  # worker thread
        if self._loop is None:
            self._queue.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the consumer's loop is closed: nobody listens any more
            self.cancel()

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self._queue.get()
            yield event
            if event.finish_reason is not None or event.error is not None:
                return

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        while True:
            event = self._queue.get(timeout=timeout)
            yield event
            if event.finish_reason is not None or event.error is not None:
                return

    def result(self, timeout: float | None = None) -> Completion:
        return collect(list(self.events(timeout)), self.request.params.logprobs is not None)

    async def aresult(self) -> Completion:
        return collect([e async for e in self], self.request.params.logprobs is not None)


@dataclass
class _Running:
    """Engine-private state of one admitted request (owned by the worker thread)."""

    handle: RequestHandle
    slot: int
    layout: layout.RowLayout
    generator: torch.Generator
    detok: sampling.Detokenizer
    cached: int = 0  # tokens (virtual + prompt + generated) written to the cache
    last: int = 0  # the newest generated token, not yet in the cache
    generated: list[int] = field(default_factory=list)
    text: str = ""  # completion text so far (stop strings already cut off)
    emitted: int = 0  # characters of `text` already sent
    offset: int = 0  # characters of the returned text before the completion (the echoed prompt)

    @property
    def request(self) -> Request:
        return self.handle.request

    @property
    def params(self) -> SamplingParams:
        return self.handle.request.params


class Engine:
    def __init__(self, loaded: LoadedModel, registry: AdapterRegistry | None = None, config: EngineConfig = EngineConfig()):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.info = loaded.info
        p = next(self.model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.registry = registry or AdapterRegistry(loaded.name, self.device, self.dtype)
        self.config = config
        cap = min(self.info.max_positions, config.default_max_seq_len)
        self.max_seq_len = min(config.max_seq_len or cap, self.info.max_positions)
        self.cache = KVCache(self.info, config.max_batch, self.max_seq_len, self.dtype, self.device)
        self._free = list(range(config.max_batch))  # heap: always take the lowest free slot
        self._running: list[_Running] = []
        self._waiting: deque[RequestHandle] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()

    # ------------------------------------------------------------------ public API
    @property
    def model_name(self) -> str:
        return self.loaded.name

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def start(self) -> "Engine":
        with self._cond:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Refuse new requests, fail the pending ones with `EngineUnavailable`, join the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._fail_all(EngineUnavailable("the engine stopped before the request finished"))

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stopping

    def stats(self) -> dict:
        with self._cond:
            return {"running": len(self._running), "waiting": len(self._waiting), "free_slots": len(self._free),
                    "max_batch": self.config.max_batch, "max_seq_len": self.max_seq_len}

    def submit(self, request: Request) -> RequestHandle:
        """Validate and queue a request. Raises InvalidRequest (400), CapacityExceeded (429)
        when the waiting queue is full, EngineUnavailable (503) when stopping."""
        self.validate(request)
        if not request.request_id:
            request = replace(request, request_id=f"req-{next(self._ids)}")
        handle = RequestHandle(request)
        with self._cond:
            if self._stopping:
                raise EngineUnavailable("the server is shutting down")
            if len(self._waiting) >= self.config.max_queue:
                raise CapacityExceeded(
                    f"the request queue is full ({self.config.max_queue} waiting, {self.config.max_batch} running); retry later"
                )
            self._waiting.append(handle)
            self._cond.notify_all()
        return handle

    def validate(self, request: Request) -> None:
        p = request.params
        sampling.check(p)
        if not request.prompt_ids:
            raise InvalidRequest("the prompt is empty")
        bad = [t for t in request.prompt_ids if not 0 <= t < self.info.vocab_size]
        if bad:
            raise InvalidRequest(f"prompt token ids out of range 0..{self.info.vocab_size - 1}: {bad[:5]}")
        lay = layout.row_layout(request.setup)
        extra = lay.prefix_len + lay.virtual_tokens  # adapter prefix entries and soft-prompt tokens
        need = extra + len(request.prompt_ids) + p.max_tokens
        if need > self.max_seq_len:
            parts = f"{len(request.prompt_ids)} prompt + {p.max_tokens} max_tokens" + (f" + {extra} adapter" if extra else "")
            raise InvalidRequest(
                f"this request needs {need} tokens of context ({parts}), more than the maximum context length "
                f"{self.max_seq_len}; shorten the prompt or lower max_tokens"
            )

    # ------------------------------------------------------------------ worker loop
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._stopping or self._running or self._waiting):
                        self._cond.wait()
                    if self._stopping:
                        return
                    for h in [h for h in self._waiting if h.cancelled]:
                        self._waiting.remove(h)
                        h._push(Event(finish_reason="cancelled", prompt_tokens=len(h.request.prompt_ids)))
                    admitted = [self._waiting.popleft() for _ in range(min(len(self._free), len(self._waiting)))]
                try:
                    self._step(admitted)
                except Exception as e:  # never let one bad step take the server down
                    log.exception("engine step failed")
                    for r in list(self._running):
                        self._fail(r, e)

    def _step(self, admitted: list[RequestHandle]) -> None:
        for r in [r for r in self._running if r.handle.cancelled]:
            self._finish(r, "cancelled")
        for handle in admitted:
            self._prefill(handle)
        if self._running:
            self._decode()

    def _prefill(self, handle: RequestHandle) -> None:
        req, p = handle.request, handle.request.params
        lay = layout.row_layout(req.setup)
        r = _Running(handle, heapq.heappop(self._free), lay, sampling.make_generator(p.seed, self.device),
                     sampling.Detokenizer(self.tokenizer, () if p.echo else req.prompt_ids))
        self._running.append(r)
        try:
            layout.write_prefixes(self.cache, r.slot, req.setup, self.info.num_layers)
            tokens = [0] * lay.virtual_tokens + list(req.prompt_ids)
            echo_logprobs = p.echo and p.logprobs is not None
            batch = ForwardBatch.build(
                [tokens], [lay.positions(0, len(tokens))], [r.slot], [lay.prefix_len], self.device,
                adapters=build_adapter_batch([req.setup], [len(tokens)], [lay.virtual_tokens > 0], len(tokens), self.device),
                all_logits=echo_logprobs,
                prefix_hidden=self._prefix_hidden([req.setup]),
            )
            logits = self.model(batch, self.cache)[0].float()  # [S or 1, V]
            r.cached = len(tokens)
            if p.echo:
                self._emit_prompt(r, logits[lay.virtual_tokens :] if echo_logprobs else None)
            if p.max_tokens == 0:
                self._finish(r, "length")
                return
            self._accept(r, sampling.next_tokens(logits[-1:], [p], [r.generator])[0], logits[-1])
        except Exception as e:
            self._fail(r, e)

    def _decode(self) -> None:
        rows = sorted(self._running, key=lambda r: r.slot)  # contiguous slots -> a cache view
        setups = [r.request.setup for r in rows]
        B = len(rows)
        batch = ForwardBatch.build(
            [[r.last] for r in rows],
            [r.layout.positions(r.cached, 1) for r in rows],
            [r.slot for r in rows],
            [r.layout.prefix_len + r.cached for r in rows],
            self.device,
            adapters=build_adapter_batch(setups, [1] * B, [False] * B, 1, self.device),
            prefix_hidden=self._prefix_hidden(setups),
        )
        logits = self.model(batch, self.cache)[:, -1].float()  # [B, V]
        for r in rows:
            r.cached += 1
        tokens = sampling.next_tokens(logits, [r.params for r in rows], [r.generator for r in rows])
        for b, (r, token) in enumerate(zip(rows, tokens)):
            try:
                self._accept(r, token, logits[b])
            except Exception as e:
                self._fail(r, e)

    def _prefix_hidden(self, setups: Sequence[Setup]) -> dict:
        if not any(a.prefix is not None for s in setups for a in s):
            return {}
        return layout.hidden_prefix_ranges(setups, self.info.num_layers, self.device)

    # ------------------------------------------------------------------ outputs
    def _token_str(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _logprob(self, logits: Tensor, token: int, n: int, offset: int) -> TokenLogprob:
        """logits [V] predicting `token`: its logprob and the n most likely alternatives."""
        lp, top = sampling.token_logprobs(logits, token, n)
        alternatives: dict[str, float] = {}
        for t, v in top:  # most likely first: tokens that decode alike keep the highest logprob
            alternatives.setdefault(self._token_str(t), v)
        alternatives.setdefault(self._token_str(token), lp)  # the chosen token, as OpenAI lists it
        return TokenLogprob(self._token_str(token), lp, alternatives, offset)

    def _emit_prompt(self, r: _Running, logits: Tensor | None) -> None:
        """Echo: the prompt's text and, with logits [P, V], each prompt token's logprob
        given the tokens before it (the first has none, as in OpenAI's API)."""
        n = r.params.logprobs or 0
        entries, text = [], ""
        for i, token in enumerate(r.request.prompt_ids):
            if logits is not None:
                if i == 0:
                    entries.append(TokenLogprob(self._token_str(token), None, None, len(text)))
                else:
                    entries.append(self._logprob(logits[i - 1], token, n, len(text)))
            text += r.detok.push(token)
        text += r.detok.flush()
        r.offset = len(text)
        r.handle._push(Event(text=text, logprobs=tuple(entries), prompt_tokens=len(r.request.prompt_ids)))

    def _accept(self, r: _Running, token: int, logits: Tensor) -> None:
        """Record a generated token, check stop conditions, emit what is safe to emit."""
        p = r.params
        r.generated.append(token)
        r.last = token
        entry = ()
        if p.logprobs is not None:
            entry = (self._logprob(logits, token, p.logprobs, r.offset + len(r.text)),)
        finish = None
        start = max(len(r.text) - p.max_stop_len + 1, 0)
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.loaded.eos_token_ids):
            finish = "stop"  # the end token itself adds no text
        else:
            r.text += r.detok.push(token)
            if len(r.generated) >= p.max_tokens:
                finish = "length"
        if finish:
            r.text += r.detok.flush()  # an unfinished character at the very end becomes U+FFFD
        if p.stop and (cut := sampling.find_stop(r.text, p.stop, start)) is not None:
            r.text, finish = r.text[:cut], "stop"
        # hold back a tail that could still become a stop string
        safe = len(r.text) if finish or not p.stop else max(len(r.text) - p.max_stop_len + 1, r.emitted)
        delta = r.text[r.emitted : safe]
        r.emitted = safe
        if finish is None:
            r.handle._push(Event(text=delta, token_ids=(token,), logprobs=entry))
        else:
            self._finish(r, finish, Event(text=delta, token_ids=(token,), logprobs=entry))

    def _release(self, r: _Running) -> None:
        if r in self._running:
            self._running.remove(r)
            heapq.heappush(self._free, r.slot)

    def _finish(self, r: _Running, reason: str, last: Event = Event()) -> None:
        self._release(r)
        r.handle._push(replace(last, finish_reason=reason, prompt_tokens=len(r.request.prompt_ids),
                               completion_tokens=len(r.generated)))

    def _fail(self, r: _Running, error: Exception) -> None:
        if not isinstance(error, AdapterRuntimeError):
            log.exception("request %s failed", r.request.request_id, exc_info=error)
            error = AdapterRuntimeError(f"internal error: {type(error).__name__}: {error}")
        self._release(r)
        r.handle._push(Event(error=error))

    def _fail_all(self, error: AdapterRuntimeError) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for h in waiting:
            h._push(Event(error=error))
        for r in list(self._running):
            self._fail(r, error)


def build_engine(
    model: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    config: EngineConfig = EngineConfig(),
    adapters: Sequence[tuple[str, str]] = (),
) -> Engine:
    """Load the base model and the named adapter directories; the engine is not started."""
    from .models import load_model

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(model, dtype, device)
    engine = Engine(loaded, config=config)
    if adapters:
        from .formats import load_adapter

        for name, directory in adapters:
            engine.registry.register(name, load_adapter(directory, engine.info, name))
    return engine
