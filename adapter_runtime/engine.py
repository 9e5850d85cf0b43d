"""The engine: one frozen base model, a slotted KV cache and one worker thread.

The work is split by job:
  scheduler.py  the waiting queue, admission into KV slots, the per-step token budget
                (chunked prefill) - pure bookkeeping, testable without a model;
  runner.py     the device side: builds a step's packed batch (decode rows and prompt chunks
                together), runs the model, returns logits; adapters live in its banks;
  output.py     per request: detokenization, stop strings, logprobs, events;
  engine.py     (this file) the worker thread, the command queue (merge/reset between steps),
                sampling through one narrow call, and the public API (`submit`, handles).

Each step of the worker loop: drop cancelled requests; run queued commands; ask the scheduler
for a plan (admitting requests while a slot is free, writing their prefix-tuning entries);
one forward for the plan's decode rows and prompt chunks; sample one token per row that needs
one; hand each to its request's output processor. The HTTP side only calls `submit` and reads
the handle's events; all torch work happens on the worker thread.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable, Iterator, Sequence

import torch

from . import layout, sampling
from . import merge as merge_ops
from .batch import Setup
from .composition import check_reft_prompt
from .errors import (AdapterConflict, AdapterRuntimeError, CapacityExceeded, EngineUnavailable, InvalidRequest,
                     ModelLoadError, NumericOverflow)
from .methods import prefix as prefix_method
from .models import LoadedModel
from .models.common import KVCache
from .output import Event, RequestOutput, TokenLogprob
from .registry import AdapterRegistry, CacheObserver
from .runner import ModelRunner, RowState, freeze_heap
from .sampling import SamplingParams
from .scheduler import Scheduler, Sequence as Seq, StepPlan
from .threads import compute_threads, release_thread_pool, use_compute_threads

log = logging.getLogger(__name__)

__all__ = ["Completion", "Engine", "EngineConfig", "EngineHooks", "Event", "Request", "RequestHandle", "TokenLogprob",
           "build_engine", "collect"]


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 32  # KV slots = requests decoded together
    max_seq_len: int | None = None  # cache entries per slot (prefix + prompt + completion); None = model max
    max_queue: int = 256  # requests waiting for a slot before `submit` refuses (429)
    default_max_seq_len: int = 4096  # cap when max_seq_len is None and the model allows more
    token_budget: int = 512  # most tokens (decode rows + prompt chunks) in one step: chunked prefill
    compile: bool = False  # run decode-only steps through torch.compile (the server turns it on)
    bank_slots: int | None = None  # adapters kept in the device banks; None = max(max_batch, 16)
    threads: int | None = None  # torch threads of the worker's math; None = threads.compute_threads()


IDLE_RELEASE_S = 0.2  # the worker lets its OpenMP helper threads go after this long without work


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
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None
    cumulative_logprob: float = 0.0  # what best_of ranks by


def check_request(prompt_ids: Sequence[int], p: SamplingParams, vocab_size: int, max_seq_len: int,
                  extra_tokens: int = 0) -> None:
    """The checks every engine makes before accepting a request (the cluster's ingress makes
    them too, so that a stream is refused before it starts); `extra_tokens`: the adapters'."""
    sampling.check(p, vocab_size)
    if not prompt_ids:
        raise InvalidRequest("the prompt is empty")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(f"prompt token ids out of range 0..{vocab_size - 1}: {bad[:5]}")
    need = extra_tokens + len(prompt_ids) + p.max_tokens
    if need > max_seq_len:
        parts = f"{len(prompt_ids)} prompt + {p.max_tokens} max_tokens" + (f" + {extra_tokens} adapter" if extra_tokens else "")
        raise InvalidRequest(f"this request needs {need} tokens of context ({parts}), more than the maximum context "
                             f"length {max_seq_len}; shorten the prompt or lower max_tokens")


def shares_prefill(requests: Sequence[Request]) -> bool:
    """Whether these requests may share one prefill: one prompt, the very same adapter objects,
    and nothing that reads the prompt's own logits (echo) or stops before a first token."""
    first = requests[0]
    return all(r.prompt_ids == first.prompt_ids and len(r.setup) == len(first.setup)
               and all(a is b for a, b in zip(r.setup, first.setup))
               and not r.params.echo and r.params.max_tokens > 0 for r in requests)


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


@dataclass(eq=False)
class _Active:
    """Engine-private state of one admitted request (owned by the worker thread)."""

    handle: RequestHandle
    seq: Seq
    row: RowState
    output: RequestOutput
    sampler: sampling.SamplingState
    first_token_seen: bool = False

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
        bank_slots = config.bank_slots or max(config.max_batch, self.registry.limits.device_adapters)
        self.threads = compute_threads(config.threads)
        self.runner = ModelRunner(self.model, self.cache, bank_slots, compile=config.compile, threads=self.threads)
        self.scheduler = Scheduler(config.max_batch, config.token_budget, config.max_queue,
                                   separate_prefill=config.compile)
        self._active: dict[int, _Active] = {}  # id(seq) -> state
        self._cond = threading.Condition()
        self._stopping = False
        self._drain_deadline: float | None = None  # set by `drain`: no new requests; fail the rest after it
        self.hooks = hooks
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._merge: merge_ops.MergeRecord | None = None
        self._commands: list[tuple] = []  # (fn, Future) to run between two steps

    def _allocate_cache(self) -> KVCache:
        """The KV cache is sized up front (max_batch x max_seq_len entries, plus one scratch slot
        that padding rows of a static step write to): say how big it is, and turn an
        out-of-memory into an error that names the two knobs."""
        per_token = 2 * self.info.num_layers * self.info.num_kv_heads * self.info.head_dim * self.dtype.itemsize
        need = per_token * (self.config.max_batch + 1) * self.max_seq_len
        log.info("KV cache: %d slots x %d tokens = %.1f MiB on %s", self.config.max_batch, self.max_seq_len,
                 need / 2**20, self.device)
        try:
            return KVCache(self.info, self.config.max_batch + 1, self.max_seq_len, self.dtype, self.device)
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
        if self.config.compile:  # a long-running server: keep full collections off the start-up objects
            freeze_heap()
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
            return bool(self.scheduler.running or self.scheduler.waiting or self._commands)

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
        self.runner.close()
        if self.config.compile:
            gc.unfreeze()  # what start froze may be collected again (an engine stopped in a live process)

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stopping and self._drain_deadline is None

    def stats(self) -> dict:
        with self._cond:
            return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                    "free_slots": self.scheduler.free_slots, "max_batch": self.config.max_batch,
                    "max_seq_len": self.max_seq_len}

    def submit(self, request: Request, on_done: Callable[[], None] | None = None) -> RequestHandle:
        """Validate and queue a request. Raises InvalidRequest (400), CapacityExceeded (429)
        when the waiting queue is full, EngineUnavailable (503) when stopping. `on_done` runs
        once when the request ends (finished, failed or cancelled), not if submit raises."""
        return self.submit_group([request], [on_done])[0]

    def submit_group(self, requests: Sequence[Request],
                     on_done: Sequence[Callable[[], None] | None] | None = None) -> list[RequestHandle]:
        """Queue several requests at once, all or none (as `submit`). When they are choices of
        one prompt (n / best_of: the same prompt ids and the same adapter objects), the first
        prefills the prompt and each other one, once it holds a KV slot, takes a copy of those
        KV entries and samples its first token from the same logits with its own sampling
        state, instead of prefilling the prompt again."""
        on_done = list(on_done) if on_done is not None else [None] * len(requests)
        prepared = [self._prepare(r, d) for r, d in zip(requests, on_done)]
        seqs = [seq for _, seq in prepared]
        if len(seqs) > 1 and shares_prefill([h.request for h, _ in prepared]) and not any(s.whole_prompt for s in seqs):
            leader = seqs[0]
            leader.followers = seqs[1:]
            for follower in seqs[1:]:
                follower.leader = leader
        with self._cond:
            if self._stopping or self._drain_deadline is not None:
                raise EngineUnavailable("the server is shutting down")
            self.scheduler.enqueue(*seqs)
            self._cond.notify_all()
        return [handle for handle, _ in prepared]

    def _prepare(self, request: Request, on_done: Callable[[], None] | None) -> tuple[RequestHandle, Seq]:
        self.validate(request)
        if not request.request_id:
            request = replace(request, request_id=f"req-{next(self._ids)}")
        handle = RequestHandle(request, on_done)
        lay = layout.row_layout(request.setup)
        p = request.params
        gated = any(getattr(e, "gate_weight", None) is not None for a in request.setup for e in a.linear.values()) or \
            any(b.gate is not None for a in request.setup for b in a.bottleneck.values())
        seq = Seq(handle, lay.virtual_tokens + len(request.prompt_ids),
                  whole_prompt=gated or lay.recompute > 0 or (p.echo and p.logprobs is not None))
        return handle, seq

    def validate(self, request: Request) -> None:
        check_reft_prompt(request.setup, len(request.prompt_ids))
        lay = layout.row_layout(request.setup)
        # adapter prefix entries and soft-prompt tokens take context too
        check_request(request.prompt_ids, request.params, self.info.vocab_size, self.max_seq_len,
                      lay.prefix_len + lay.virtual_tokens)

    # ------------------------------------------------------------------ worker loop
    def _loop(self) -> None:
        use_compute_threads(self.threads)  # only this thread (and the compile thread) runs multi-threaded
        with torch.inference_mode():
            while True:
                with self._cond:
                    idle = False
                    while not (self._stopping or self.scheduler.running or self.scheduler.waiting or self._commands):
                        if not self._cond.wait(timeout=None if idle else IDLE_RELEASE_S):
                            release_thread_pool()  # idle: its helper threads would slow other threads' math
                            idle = True  # then sleep until notified
                    if self._stopping:
                        return
                    for seq in self.scheduler.drop_waiting(lambda s: s.payload.cancelled):
                        seq.payload._push(Event(finish_reason="cancelled",
                                                prompt_tokens=len(seq.payload.request.prompt_ids)))
                    late = self._drain_deadline is not None and time.monotonic() > self._drain_deadline
                if late:  # draining and past the grace period: cancel what is left
                    self._fail_all(EngineUnavailable("the server shut down before the request finished "
                                                     "(shutdown grace period exceeded)"))
                    continue
                self._run_commands()  # merge / reset: between steps, never inside one
                for state in [s for s in self._active.values() if s.handle.cancelled]:
                    self._finish(state, "cancelled")
                with self._cond:
                    plan = self.scheduler.schedule()
                try:
                    self._step(plan)
                except Exception as e:  # never let one bad step take the server down
                    log.exception("engine step failed")
                    for state in list(self._active.values()):
                        self._fail(state, e)

    def _admit(self, seq: Seq) -> _Active | None:
        """A request just got a KV slot: its per-request state, its prefix entries in the cache,
        its adapter in the banks. On failure the request fails alone."""
        handle: RequestHandle = seq.payload
        req, p = handle.request, handle.request.params
        lay = layout.row_layout(req.setup)
        row = RowState([0] * lay.virtual_tokens + list(req.prompt_ids), req.setup, lay,
                       all_logits=p.echo and p.logprobs is not None)
        output = RequestOutput(req.prompt_ids, p, self.tokenizer, self.loaded.eos_token_ids, handle._push)
        sampler = sampling.SamplingState(p, req.prompt_ids, self.info.vocab_size, self.loaded.eos_token_ids, self.device)
        state = _Active(handle, seq, row, output, sampler)
        self._active[id(seq)] = state
        try:
            prefix_method.write(self.cache, seq.slot, req.setup, self.info.num_layers)
            self.runner.admit(req.setup, [r.row.setup for r in self._active.values() if r is not state])
        except Exception as e:
            self._fail(state, e)
            return None
        return state

    def _step(self, plan: StepPlan) -> None:
        for seq in plan.admitted:
            self._admit(seq)
        plan = StepPlan([s for s in plan.decode if not s.finished], [c for c in plan.prefill if not c.seq.finished])
        if plan.empty:
            return
        rows = {id(s): self._active[id(s)].row for s in [*plan.decode, *(c.seq for c in plan.prefill)]}
        merged = self._merge.merged if self._merge is not None else None
        logits = self.runner.execute(plan, rows, merged).float()  # [M, V]
        self.scheduler.advance(plan)
        # rows that get a token now: every decode row, and each chunk that completes its prompt
        takers: list[tuple[_Active, int]] = []  # (request, its row of logits)
        m = 0
        for seq in plan.decode:
            takers.append((self._active[id(seq)], m))
            m += 1
        for chunk in plan.prefill:
            state = self._active[id(chunk.seq)]
            n = chunk.count if state.row.all_logits else 1
            rows_logits = logits[m : m + n]
            m += n
            if not chunk.completes_prompt:
                continue
            try:
                if state.params.echo:
                    v = state.row.layout.virtual_tokens
                    state.output.prompt_chunk(0, rows_logits[v:] if state.row.all_logits else None)
                    state.output.emit_prompt()
                if state.params.max_tokens == 0:
                    self._finish(state, "length")
                    continue
            except Exception as e:
                self._fail(state, e)
                continue
            takers.append((state, m - 1))
            for follower in self.scheduler.release_followers(chunk.seq):  # the other choices of this prompt
                copy = self._active.get(id(follower))
                if copy is None:
                    continue
                self.cache.copy_slot(chunk.seq.slot, follower.slot, state.row.layout.prefix_len + chunk.seq.prompt_len)
                takers.append((copy, m - 1))
        if not takers:
            return
        index = [i for _, i in takers]
        taken = logits[: len(index)] if index == list(range(len(index))) else logits[index]  # [B, V]
        tokens = sampling.choose(taken, [s.sampler for s, _ in takers])
        for (state, i), token in zip(takers, tokens):
            if token is None:  # NaN / inf logits: fail this request alone, never emit a token from them
                self._fail(state, non_finite(state, self.runner.dtype))
                continue
            try:  # a row's logits only for the requests that return logprobs
                self._accept(state, token, logits[i] if state.params.logprobs is not None else None)
            except Exception as e:
                self._fail(state, e)

    def _accept(self, state: _Active, token: int, logits: torch.Tensor | None) -> None:
        state.row.last = token
        if not state.first_token_seen:
            state.first_token_seen = True
            self._hook(self.hooks.first_token, state.request, time.monotonic() - state.handle.submitted)
        last = state.output.accept(token, logits)
        if last is not None:
            self._finish(state, last.finish_reason, replace(last, finish_reason=None))

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
            self.runner.refresh_weights()
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
            self.runner.refresh_weights()
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
            commands, self._commands = self._commands, []
        for fn, future in commands:
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up waiting: never apply it late
            try:
                future.set_result(fn())
            except Exception as e:
                future.set_exception(e)

    # ------------------------------------------------------------------ endings
    def _hook(self, fn, *args) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:  # an observer never takes the engine down
            log.exception("engine hook failed")

    def _release(self, state: _Active) -> bool:
        """Free the request's slot; False if it was already released."""
        if self._active.pop(id(state.seq), None) is None:
            return False
        with self._cond:
            self.scheduler.finish(state.seq)
        return True

    def _finish(self, state: _Active, reason: str, last: Event = Event()) -> None:
        if not self._release(state):
            return
        prompt, completion = len(state.request.prompt_ids), len(state.output.generated)
        self._hook(self.hooks.finished, state.request, prompt, completion)
        state.handle._push(replace(last, finish_reason=reason, prompt_tokens=prompt, completion_tokens=completion,
                                   cumulative_logprob=state.sampler.cumulative_logprob))

    def _fail(self, state: _Active, error: Exception) -> None:
        if not isinstance(error, AdapterRuntimeError):
            log.exception("request %s failed", state.request.request_id, exc_info=error)
            error = internal_error(state.request.request_id)  # the details go to the log, never to the client
        if self._release(state):
            self._hook(self.hooks.finished, state.request, len(state.request.prompt_ids), len(state.output.generated))
        state.handle._push(Event(error=error))

    def _fail_all(self, error: AdapterRuntimeError) -> None:
        with self._cond:
            waiting = self.scheduler.take_waiting()
            commands, self._commands = self._commands, []
        for _, future in commands:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
        for seq in waiting:
            seq.payload._push(Event(error=error))
        for state in list(self._active.values()):
            self._fail(state, error)


def non_finite(state: _Active, dtype: torch.dtype) -> NumericOverflow:
    """The error of a request whose logits came out NaN or infinite, naming what can cause it."""
    setup = getattr(state.request.setup, "pinned", state.request.setup)  # a composition: every adapter it holds
    names = list(dict.fromkeys(repr(n) for a in setup if (n := getattr(a, "name", None))))
    number_format = str(dtype).removeprefix("torch.")
    causes = []
    if len(names) == 1:
        causes.append(f"adapter {names[0]} overflows on this input (its weights are too large for {number_format})")
    elif names:
        causes.append(f"one of the adapters {', '.join(names)} overflows on this input (too large for {number_format})")
    if state.params.repetition_penalty != 1.0:
        causes.append(f"repetition_penalty {state.params.repetition_penalty} pushes every logit to -infinity")
    if not causes:
        causes.append(f"the base model overflows on this input ({number_format})")
    return NumericOverflow(f"the model's output for this request is not finite (NaN or infinity) after "
                           f"{len(state.output.generated)} generated tokens, so no token was sampled from it: "
                           + ", or ".join(causes))


def internal_error(request_id: str) -> AdapterRuntimeError:
    """What a client sees of an unexpected exception: no type, no message, no path."""
    return AdapterRuntimeError(f"internal error while generating (request {request_id}); the server log has the details")


def build_engine(
    model: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    config: EngineConfig = EngineConfig(),
    adapters: Sequence[tuple[str, str]] = (),
    hooks: EngineHooks = EngineHooks(),
    cache_observer: CacheObserver | None = None,
) -> Engine:
    """Load the base model and the named adapter directories; the engine is not started.
    `hooks` and `cache_observer` are an observer's callbacks (the server's metrics)."""
    from .models import load_model

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(model, dtype, device)
    weight = next(loaded.model.parameters())
    registry = AdapterRegistry(loaded.name, weight.device, weight.dtype, observer=cache_observer)
    engine = Engine(loaded, registry, config, hooks)
    if config.compile:
        engine.runner.warm_up()
    if adapters:
        from .formats import load_adapter

        for name, directory in adapters:
            engine.registry.register(name, load_adapter(directory, engine.info, name))
    return engine
