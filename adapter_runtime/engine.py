"""The engine: one frozen base model, a slotted KV cache and one worker thread.

Each step of the worker loop:
  1. drop cancelled requests (their KV slots are freed at once);
  2. admit waiting requests while a slot is free: write their prefix-tuning entries, prefill
     their prompts (together, right-padded, in forwards of at most PREFILL_TOKENS tokens; a
     request echoing prompt logprobs alone) and emit each first token;
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
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable, Iterator, Sequence

import torch
from torch import Tensor

from concurrent.futures import Future

from . import layout, sampling
from . import merge as merge_ops
from .batch import ForwardBatch, Setup, build_adapter_batch
from .errors import (AdapterConflict, AdapterRuntimeError, CapacityExceeded, EngineUnavailable, InvalidRequest,
                     ModelLoadError)
from .models import LoadedModel
from .models.common import KVCache
from .registry import AdapterRegistry
from .sampling import SamplingParams

log = logging.getLogger(__name__)

PREFILL_TOKENS = 8192  # most (padded) prompt tokens in one prefill forward


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 32  # KV slots = requests decoded together
    max_seq_len: int | None = None  # cache entries per slot (prefix + prompt + completion); None = model max
    max_queue: int = 256  # requests waiting for a slot before `submit` refuses (429)
    default_max_seq_len: int = 4096  # cap when max_seq_len is None and the model allows more


@dataclass(frozen=True)
class EngineHooks:
    """Callbacks an observer (e.g. the server's metrics) passes in; they run on the worker
    thread, must be quick, and any exception they raise is logged and ignored."""

    first_token: Callable[["Request", float], None] | None = None  # (request, seconds since submit)
    finished: Callable[["Request", int, int], None] | None = None  # (request, prompt tokens, completion tokens)


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
    token_id: int = -1
    top_ids: tuple[tuple[int, float], ...] = ()  # the n most likely (token id, logprob), most likely first


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
    cumulative_logprob: float = 0.0  # last event: sum of the generated tokens' log-probabilities


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None
    cumulative_logprob: float = 0.0  # what best_of ranks by


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
        cumulative_logprob=last.cumulative_logprob,
    )


class RequestHandle:
    """What `submit` returns. Events arrive from the worker thread; read them either from
    asyncio (`async for event in handle`, when submitted inside a running loop) or blocking
    (`handle.events()` / `handle.result()`, when submitted outside one)."""

    def __init__(self, request: Request, on_done: Callable[[], None] | None = None):
        self.request = request
        self._on_done = on_done  # called once, on the worker thread, with the last event
        self._cancelled = threading.Event()
        self.submitted = time.monotonic()
        self.done = False  # the last event was pushed
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
        if self.done:
            return  # one final event per request, whatever else goes wrong
        self.done = event.finish_reason is not None or event.error is not None
        if (event.finish_reason is not None or event.error is not None) and self._on_done is not None:
            done, self._on_done = self._on_done, None
            done()  # e.g. unpin the request's adapters
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
    sampler: sampling.SamplingState
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
    def __init__(self, loaded: LoadedModel, registry: AdapterRegistry | None = None, config: EngineConfig = EngineConfig(),
                 hooks: EngineHooks = EngineHooks()):
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
        self.cache = self._allocate_cache()
        self._free = list(range(config.max_batch))  # heap: always take the lowest free slot
        self._running: list[_Running] = []
        self._waiting: deque[RequestHandle] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._drain_deadline: float | None = None  # set by `drain`: no new requests; fail the rest after it
        self.hooks = hooks
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._decode_adapters: tuple | None = None  # (row key, merge state, AdapterBatch, prefix_hidden) of the last decode
        self._merge: merge_ops.MergeRecord | None = None
        self._commands: deque[tuple] = deque()  # (fn, Future) to run between two steps

    def _allocate_cache(self) -> KVCache:
        """The KV cache is sized up front (max_batch x max_seq_len entries): say how big it is,
        and turn an out-of-memory into an error that names the two knobs."""
        per_token = 2 * self.info.num_layers * self.info.num_kv_heads * self.info.head_dim * self.dtype.itemsize
        need = per_token * self.config.max_batch * self.max_seq_len
        log.info("KV cache: %d slots x %d tokens = %.1f MiB on %s", self.config.max_batch, self.max_seq_len,
                 need / 2**20, self.device)
        try:
            return KVCache(self.info, self.config.max_batch, self.max_seq_len, self.dtype, self.device)
        except (torch.OutOfMemoryError, RuntimeError, MemoryError) as e:
            raise ModelLoadError(
                f"cannot allocate the KV cache ({need / 2**30:.1f} GiB for {self.config.max_batch} slots x "
                f"{self.max_seq_len} tokens on {self.device}): lower --max-batch or --max-seq-len ({e})"
            ) from None

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

    def drain(self, grace: float) -> None:
        """Stop admitting (submit raises EngineUnavailable); requests already accepted run on,
        and those still unfinished `grace` seconds from now fail with EngineUnavailable."""
        with self._cond:
            deadline = time.monotonic() + max(grace, 0.0)
            if self._drain_deadline is None or deadline < self._drain_deadline:
                self._drain_deadline = deadline
            self._cond.notify_all()

    @property
    def busy(self) -> bool:
        with self._cond:
            return bool(self._running or self._waiting or self._commands)

    def stop(self, timeout: float | None = 30.0, grace: float | None = None) -> None:
        """Refuse new requests, fail the pending ones with `EngineUnavailable`, join the worker.
        With `grace`, first drain: let accepted requests finish for up to `grace` seconds."""
        if grace is not None and self._thread is not None:
            self.drain(grace)
            while self.busy and self._thread is not None and self._thread.is_alive():
                time.sleep(0.02)
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
        return self._thread is not None and not self._stopping and self._drain_deadline is None

    def stats(self) -> dict:
        with self._cond:
            return {"running": len(self._running), "waiting": len(self._waiting), "free_slots": len(self._free),
                    "max_batch": self.config.max_batch, "max_seq_len": self.max_seq_len}

    def submit(self, request: Request, on_done: Callable[[], None] | None = None) -> RequestHandle:
        """Validate and queue a request. Raises InvalidRequest (400), CapacityExceeded (429)
        when the waiting queue is full, EngineUnavailable (503) when stopping. `on_done` runs
        once when the request ends (finished, failed or cancelled), not if submit raises."""
        self.validate(request)
        if not request.request_id:
            request = replace(request, request_id=f"req-{next(self._ids)}")
        handle = RequestHandle(request, on_done)
        with self._cond:
            if self._stopping or self._drain_deadline is not None:
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
        sampling.check(p, self.info.vocab_size)
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
                    while not (self._stopping or self._running or self._waiting or self._commands):
                        self._cond.wait()
                    if self._stopping:
                        return
                    for h in [h for h in self._waiting if h.cancelled]:
                        self._waiting.remove(h)
                        h._push(Event(finish_reason="cancelled", prompt_tokens=len(h.request.prompt_ids)))
                    admitted = [self._waiting.popleft() for _ in range(min(len(self._free), len(self._waiting)))]
                    late = self._drain_deadline is not None and time.monotonic() > self._drain_deadline
                if late:  # draining and past the grace period: cancel what is left
                    self._waiting.extendleft(reversed(admitted))
                    self._fail_all(EngineUnavailable("the server shut down before the request finished "
                                                     "(shutdown grace period exceeded)"))
                    continue
                self._run_commands()  # merge / reset: between steps, never inside one
                try:
                    self._step(admitted)
                except Exception as e:  # never let one bad step take the server down
                    log.exception("engine step failed")
                    for r in list(self._running):
                        self._fail(r, e)
                    for h in admitted:  # admitted but failed before it ran: still owed an answer
                        h._push(Event(error=internal_error(h.request.request_id)))

    def _step(self, admitted: list[RequestHandle]) -> None:
        for r in [r for r in self._running if r.handle.cancelled]:
            self._finish(r, "cancelled")
        for group in self._prefill_groups(admitted):
            self._prefill(group)
        if self._running:
            self._decode()

    def _prefill_groups(self, admitted: list[RequestHandle]) -> list[list[RequestHandle]]:
        """Admitted requests in prefill forwards of at most PREFILL_TOKENS padded tokens; a
        request that echoes prompt logprobs needs logits at every position and goes alone."""
        groups: list[list[RequestHandle]] = []
        group: list[RequestHandle] = []
        longest = 0
        for h in admitted:
            p = h.request.params
            n = layout.row_layout(h.request.setup).virtual_tokens + len(h.request.prompt_ids)
            if p.echo and p.logprobs is not None:
                groups.append([h])
                continue
            if group and (len(group) + 1) * max(longest, n) > PREFILL_TOKENS:
                groups.append(group)
                group, longest = [], 0
            group.append(h)
            longest = max(longest, n)
        return groups + ([group] if group else [])

    def _prefill(self, handles: list[RequestHandle]) -> None:
        """Write the requests' prefixes, run their prompts in one right-padded forward (rows may
        differ in length and adapters) and emit each one's first token."""
        rows: list[_Running] = []
        tokens: list[list[int]] = []
        for handle in handles:
            req, p = handle.request, handle.request.params
            lay = layout.row_layout(req.setup)
            r = _Running(handle, heapq.heappop(self._free), lay,
                         sampling.SamplingState(p, req.prompt_ids, self.info.vocab_size, self.loaded.eos_token_ids,
                                                self.device),
                         sampling.Detokenizer(self.tokenizer, () if p.echo else req.prompt_ids))
            self._running.append(r)
            try:
                layout.write_prefixes(self.cache, r.slot, req.setup, self.info.num_layers)
            except Exception as e:
                self._fail(r, e)
                continue
            rows.append(r)
            tokens.append([0] * lay.virtual_tokens + list(req.prompt_ids))
        if not rows:
            return
        setups = [r.request.setup for r in rows]
        lens = [len(t) for t in tokens]
        all_logits = any(r.params.echo and r.params.logprobs is not None for r in rows)
        try:
            batch = ForwardBatch.build(
                tokens, [r.layout.positions(0, n) for r, n in zip(rows, lens)], [r.slot for r in rows],
                [r.layout.prefix_len for r in rows], self.device,
                adapters=self._adapter_batch(setups, lens, [r.layout.virtual_tokens > 0 for r in rows], max(lens)),
                all_logits=all_logits,
                prefix_hidden=self._prefix_hidden(setups),
            )
            logits = self.model(batch, self.cache).float()  # [B, S, V] (all_logits) or [B, 1, V]
        except Exception as e:
            for r in rows:
                self._fail(r, e)
            return
        for b, (r, n) in enumerate(zip(rows, lens)):
            p = r.params
            try:
                row = logits[b, :n] if all_logits else logits[b]  # [n or 1, V]
                r.cached = n
                if p.echo:
                    self._emit_prompt(r, row[r.layout.virtual_tokens :] if p.logprobs is not None else None)
                if p.max_tokens == 0:
                    self._finish(r, "length")
                    continue
                self._accept(r, sampling.choose(row[-1:], [r.sampler])[0], row[-1])
            except Exception as e:
                self._fail(r, e)

    def _decode(self) -> None:
        rows = sorted(self._running, key=lambda r: r.slot)  # contiguous slots -> a cache view
        setups = [r.request.setup for r in rows]
        B = len(rows)
        # the same rows with the same setups as last step (and no merge/reset since): reuse its
        # AdapterBatch, and with it the per-site LoRA stacks it memoizes
        key = tuple((r.slot, tuple(id(a) for a in r.request.setup)) for r in rows)
        memo = self._decode_adapters
        if memo is None or memo[0] != key or memo[1] is not self._merge:
            memo = self._decode_adapters = (key, self._merge, self._adapter_batch(setups, [1] * B, [False] * B, 1),
                                            self._prefix_hidden(setups))
        batch = ForwardBatch.build(
            [[r.last] for r in rows],
            [r.layout.positions(r.cached, 1) for r in rows],
            [r.slot for r in rows],
            [r.layout.prefix_len + r.cached for r in rows],
            self.device,
            adapters=memo[2],
            prefix_hidden=memo[3],
        )
        logits = self.model(batch, self.cache)[:, -1].float()  # [B, V]
        for r in rows:
            r.cached += 1
        tokens = sampling.choose(logits, [r.sampler for r in rows])
        for b, (r, token) in enumerate(zip(rows, tokens)):
            try:
                self._accept(r, token, logits[b])
            except Exception as e:
                self._fail(r, e)

    def _adapter_batch(self, setups: Sequence[Setup], lens: list[int], prompt: list[bool], seq_len: int):
        merged = self._merge.merged if self._merge is not None else None
        return build_adapter_batch(setups, lens, prompt, seq_len, self.device, merged=merged)

    # ------------------------------------------------------------------ merge / reset
    @property
    def merged_name(self) -> str | None:
        return self._merge.merged.adapter.name if self._merge is not None else None

    def merge(self, name: str, timeout: float | None = 60.0) -> str:
        """Fold adapter `name`'s linear effects into the base weights, between two steps.
        Raises AdapterConflict (409) if it cannot be merged or another adapter is merged."""
        adapter = self.registry.get(name)

        def do() -> str:
            if self._merge is not None:
                raise AdapterConflict(f"adapter {self.merged_name!r} is merged; reset it before merging {name!r}")
            self.registry.mark_merged(name, adapter)  # 404 if `name` was deleted or replaced meanwhile
            try:
                self._merge = merge_ops.merge(self.model, adapter)
            except BaseException:
                self.registry.clear_merged()
                raise
            log.info("merged adapter %r into the base weights", name)
            return name

        return self._between_steps(do, timeout)

    def reset(self, timeout: float | None = 60.0) -> str | None:
        """Restore the original base weights bit for bit (between two steps); returns the
        name of the adapter that was merged, or None if none was."""

        def do() -> str | None:
            if self._merge is None:
                return None
            name = self.merged_name
            merge_ops.reset(self.model, self._merge)
            self._merge = None
            self.registry.clear_merged()
            log.info("reset: adapter %r unmerged, base weights restored", name)
            return name

        return self._between_steps(do, timeout)

    def _between_steps(self, fn, timeout: float | None):
        """Run `fn` on the worker thread between two steps (or here if no worker runs). If it
        has not started within `timeout`, it is cancelled (never applied later) and this
        raises EngineUnavailable; if it started meanwhile, its real outcome is returned."""
        if self._thread is None or threading.current_thread() is self._thread:
            with torch.inference_mode():
                return fn()
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise EngineUnavailable("the server is shutting down")
            self._commands.append((fn, future))
            self._cond.notify_all()
        try:
            return future.result(timeout)
        except TimeoutError:
            if future.cancel():
                raise EngineUnavailable(f"the engine did not reach a step boundary within {timeout:g} s; "
                                        "the command was cancelled and nothing changed") from None
            return future.result()  # it is running now: answer with what really happened

    def _run_commands(self) -> None:
        with self._cond:
            commands, self._commands = list(self._commands), deque()
        for fn, future in commands:
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up waiting: never apply it late
            try:
                future.set_result(fn())
            except Exception as e:
                future.set_exception(e)

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
        return TokenLogprob(self._token_str(token), lp, alternatives, offset, token, tuple(top))

    def _emit_prompt(self, r: _Running, logits: Tensor | None) -> None:
        """Echo: the prompt's text and, with logits [P, V], each prompt token's logprob
        given the tokens before it (the first has none, as in OpenAI's API)."""
        n = r.params.logprobs or 0
        entries, text = [], ""
        for i, token in enumerate(r.request.prompt_ids):
            if logits is not None:
                if i == 0:
                    entries.append(TokenLogprob(self._token_str(token), None, None, len(text), token))
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
        if len(r.generated) == 1:
            self._hook(self.hooks.first_token, r.request, time.monotonic() - r.handle.submitted)
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
        stops = p.stop if len(r.generated) >= p.min_tokens else ()  # vLLM: no stop string before min_tokens
        if stops and (cut := sampling.find_stop(r.text, stops, start)) is not None:
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

    def _hook(self, fn, *args) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:  # an observer never takes the engine down
            log.exception("engine hook failed")

    def _finish(self, r: _Running, reason: str, last: Event = Event()) -> None:
        self._release(r)
        self._hook(self.hooks.finished, r.request, len(r.request.prompt_ids), len(r.generated))
        r.handle._push(replace(last, finish_reason=reason, prompt_tokens=len(r.request.prompt_ids),
                               completion_tokens=len(r.generated), cumulative_logprob=r.sampler.cumulative_logprob))

    def _fail(self, r: _Running, error: Exception) -> None:
        if not isinstance(error, AdapterRuntimeError):
            log.exception("request %s failed", r.request.request_id, exc_info=error)
            error = internal_error(r.request.request_id)  # the details go to the log, never to the client
        if r in self._running:
            self._hook(self.hooks.finished, r.request, len(r.request.prompt_ids), len(r.generated))
        self._release(r)
        r.handle._push(Event(error=error))

    def _fail_all(self, error: AdapterRuntimeError) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
            commands, self._commands = list(self._commands), deque()
        for _, future in commands:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
        for h in waiting:
            h._push(Event(error=error))
        for r in list(self._running):
            self._fail(r, error)


def internal_error(request_id: str) -> AdapterRuntimeError:
    """What a client sees of an unexpected exception: no type, no message, no path."""
    return AdapterRuntimeError(f"internal error while generating (request {request_id}); the server log has the details")


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
