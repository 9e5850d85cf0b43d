"""The engine as the ingress' routes see it in a cluster.

`RemoteEngine` answers the engine's public API — `submit` and its request handles, `registry`,
`merge`/`reset`, `stats` — by calling the engine replicas (replica.py) through a Ray Serve
handle, so that the app's routes run unchanged on the ingress. One engine request is two calls
routed by its adapter set (routing.py): `reserve` (the registry lookup: 404s and the like come
back before a stream starts) and `generate` (the stream of engine events), which claims the
reservation when both land on the same replica, as they do unless that replica got busy.

Cluster-wide operations: merge and reset go to every replica (`broadcast`) and return when all
have applied them; a replica that starts later (a replacement) takes the merge state at the next
sync. Deletes go to one replica, which removes the adapter from the shared store, then to all
(their copies leave their caches); any replica also re-validates each lookup against the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from adapter_runtime.engine import Completion, EngineHooks, Event, Request, check_request, collect
from adapter_runtime.errors import (AdapterRuntimeError, CapacityExceeded, EngineUnavailable, InvalidRequest)
from adapter_runtime.store import AdapterStore

from .replica import Description, Failed, Reservation, Snapshot
from .routing import random_key, routing_key

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 120.0  # one control call (an upload's validation, a merge) on a replica
SYNC_PERIOD_S = 1.0  # merge state to new replicas, per-replica stats and metrics to the ingress
STREAM_RETRIES = 2  # a request whose replica died before it sent anything is sent again


def unwrap(result: Any) -> Any:
    if isinstance(result, Failed):
        raise result.error
    return result


def failure(e: BaseException, what: str) -> AdapterRuntimeError:
    """A transport or replica failure, as the error a client sees (503 unless it is a 429)."""
    from ray.exceptions import GetTimeoutError, RayTaskError
    from ray.serve.exceptions import BackPressureError

    if isinstance(e, AdapterRuntimeError):
        return e
    if isinstance(e, BackPressureError):
        return CapacityExceeded("every engine replica's queue is full; retry later")
    if isinstance(e, (GetTimeoutError, TimeoutError)):
        return EngineUnavailable(f"no engine replica answered {what} in time; retry")
    if isinstance(e, RayTaskError):
        log.error("%s failed on an engine replica: %s", what, e)
        return AdapterRuntimeError(f"internal error on an engine replica ({type(e.cause).__name__})")
    return EngineUnavailable(f"the engine replica handling {what} failed ({type(e).__name__}); retry")


def replica_died(e: BaseException) -> bool:
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    return isinstance(e, (RayActorError, ReplicaUnavailableError))


@dataclass
class RemoteSetup:
    """What `RemoteRegistry.acquire` gives the routes in place of a tuple of adapters."""

    key: str  # routing key: the adapter set
    model: str
    stack: list[str] | None
    reservation: Reservation
    submitted: bool = False  # then the replica releases it when the request ends


class IngressStore(AdapterStore):
    """The shared store as the ingress uses it: staging uploads, zipping downloads. Cleaning up
    leftovers is the replicas' job (the ingress cannot tell whose write a temp folder is)."""

    def sweep(self) -> None:
        pass


class RemoteEngine:
    def __init__(self, handle, description: Description, settings, hooks: EngineHooks = EngineHooks()):
        self._handle = handle
        self.settings = settings
        self.model_name = description.model_name
        self.info = description.info
        self.tokenizer = description.tokenizer
        self.max_seq_len = description.max_seq_len
        self.config = description.config
        self.device = "ray-serve replicas"
        self.hooks = hooks  # the ingress' metrics (time to first token, tokens per request)
        self.registry = RemoteRegistry(self, IngressStore(settings.store_dir, description.info))
        self._merged = description.merged
        self._merge_version = 0  # replicas apply a merge state only if newer than theirs
        self.snapshots: list[Snapshot] = []
        self._accepting = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sync_task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="cluster-call")

    @classmethod
    async def connect(cls, handle, settings, hooks: EngineHooks = EngineHooks()) -> "RemoteEngine":
        """Wait for a replica (Ray Serve queues the call until one is up) and describe the engine."""
        description = await handle.options(method_name="describe").remote()
        return cls(handle, description, settings, hooks)

    # ------------------------------------------------------------------ lifecycle (as Engine's)
    def start(self) -> "RemoteEngine":
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        if self._sync_task is None:
            self._sync_task = self._loop.create_task(self._sync_forever())
        return self

    def drain(self, grace: float) -> None:
        self._accepting = False

    def stop(self, timeout: float | None = 30.0, grace: float | None = None) -> None:
        self._accepting = False
        if self._sync_task is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._sync_task.cancel)

    @property
    def running(self) -> bool:
        return self._accepting

    @property
    def busy(self) -> bool:
        return False

    async def _sync_forever(self) -> None:
        while True:
            try:
                answers = await self._handle.broadcast("sync", self._merged, self._merge_version).results_async(
                    return_exceptions=True)
                self.snapshots = sorted((a for a in answers if isinstance(a, Snapshot)), key=lambda s: s.replica)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("cluster sync failed: %s", e)
            await asyncio.sleep(SYNC_PERIOD_S)

    def stats(self) -> dict:
        """The engine stats summed over the replicas (as of the last sync), and each replica's."""
        snaps = self.snapshots
        total = {k: sum(s.engine.get(k, 0) for s in snaps) for k in ("running", "waiting", "free_slots", "max_batch")}
        replicas = [{"replica": s.replica, "pid": s.pid, "node": s.node, **s.engine, "adapters": s.adapters,
                     "resident": s.resident, "merged": s.merged, "device_hits": s.device_hits,
                     "device_misses": s.device_misses} for s in snaps]
        return {**total, "max_seq_len": self.max_seq_len, "replicas": replicas, "ingress": {"pid": os.getpid()}}

    # ------------------------------------------------------------------ requests
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def validate(self, request: Request) -> None:
        """The engine's own checks (engine.check_request), made here so that a streamed request
        is refused with its 4xx before the stream starts; the replica checks again."""
        setup = request.setup
        extra = setup.reservation.extra_tokens if isinstance(setup, RemoteSetup) else 0
        check_request(request.prompt_ids, request.params, self.info.vocab_size, self.max_seq_len, extra)

    def submit_group(self, requests, on_done=None) -> list["RemoteHandle"]:
        """Each choice on its own (a replica prefills each; sharing it would need one call for
        the group), all validated before any starts."""
        on_done = list(on_done) if on_done is not None else [None] * len(requests)
        for request in requests:
            self.validate(request)
        return [self.submit(r, d) for r, d in zip(requests, on_done)]

    def submit(self, request: Request, on_done: Callable[[], None] | None = None) -> "RemoteHandle":
        if not self._accepting:
            raise EngineUnavailable("the server is shutting down")
        if not isinstance(request.setup, RemoteSetup):
            raise InvalidRequest("a cluster request's adapters come from engine.registry.acquire")
        self.validate(request)
        request.setup.submitted = True
        return RemoteHandle(self, request, on_done)

    def _generate(self, request: Request, token: str | None):
        setup: RemoteSetup = request.setup
        handle = self._handle.options(method_name="generate", stream=True, multiplexed_model_id=setup.key)
        return handle.remote(token, setup.model, setup.stack, tuple(request.prompt_ids), request.params,
                             request.request_id)

    # ------------------------------------------------------------------ merge / reset
    @property
    def merged_name(self) -> str | None:
        return self._merged

    def merge(self, name: str, timeout: float | None = 60.0) -> str:
        """Merge `name` on every replica; returns when all have it (or, if one refuses, after
        resetting the others: all or none)."""
        version = time.time_ns()
        answers = self._broadcast("merge", name, version)
        refused = [a.error for a in answers if isinstance(a, Failed)]
        if refused:
            if any(isinstance(a, str) for a in answers):
                self._broadcast("reset", time.time_ns())
            raise refused[0]
        if not any(isinstance(a, str) for a in answers):
            raise failure(next(a for a in answers if isinstance(a, BaseException)), "the merge")
        self._merged, self._merge_version = name, version
        return name

    def reset(self, timeout: float | None = 60.0) -> str | None:
        version = time.time_ns()
        answers = self._broadcast("reset", version)
        if answers and all(isinstance(a, BaseException) for a in answers):
            raise failure(answers[0], "the reset")
        previous, self._merged, self._merge_version = self._merged, None, version
        return previous

    # ------------------------------------------------------------------ calls
    def _blocking(self, wait: Callable[[], Any]) -> Any:
        """Run a blocking Ray call; from the event loop (the routes' sync reads), in a helper
        thread, since Ray refuses to block a running loop itself."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return wait()
        return self._pool.submit(wait).result()

    def call(self, method: str, *args, key: str = "") -> Any:
        """One replica's answer (chosen by `key`'s affinity), its domain error raised."""
        try:
            response = self._handle.options(method_name=method, multiplexed_model_id=key).remote(*args)
            result = self._blocking(lambda: response.result(timeout_s=CALL_TIMEOUT_S))
        except Exception as e:
            raise failure(e, method) from None
        return unwrap(result)

    def send(self, method: str, *args, key: str = "") -> None:
        """A call whose answer nobody waits for."""
        self._handle.options(method_name=method, multiplexed_model_id=key).remote(*args)

    def _broadcast(self, method: str, *args) -> list:
        """Every live replica's answer (exceptions included), when all have answered."""
        response = self._handle.broadcast(method, *args)
        try:
            return self._blocking(lambda: response.results(timeout_s=CALL_TIMEOUT_S, return_exceptions=True))
        except Exception as e:
            raise failure(e, method) from None


class RemoteRegistry:
    """`engine.registry` for the routes: reads and writes go to a replica (the one the adapter
    routes to, where that matters), whose registry sees the shared store."""

    def __init__(self, engine: RemoteEngine, store: IngressStore):
        self._engine = engine
        self.store = store
        self.base_name = engine.model_name

    def key(self, model: str, stack=None) -> str:
        if self._engine.settings.routing == "random":
            return random_key()
        return routing_key(model, stack, self.base_name)

    def _op(self, op: str, *args, key: str = "") -> Any:
        return self._engine.call("registry", op, *args, key=key)

    def names(self) -> list[str]:
        return self._op("names")

    def models(self) -> list[str]:
        return self._op("models")

    def status(self, name: str):
        return self._op("status", name, key=self.key(name))

    def statuses(self) -> list:
        return self._op("statuses")

    def stats(self) -> dict:
        return self._op("stats")

    def check_free(self, name: str) -> None:
        self._op("check_free", name, key=self.key(name))

    def add(self, name: str, directory, format: str | None = None):
        """Validated and stored by the replica the adapter will route to (the staging folder is
        on the shared store, so every replica can read it)."""
        return self._op("add", name, str(directory), format, key=self.key(name))

    def delete(self, name: str) -> None:
        self._op("delete", name, key=self.key(name))
        self._engine._broadcast("registry", "forget", name)  # their copies leave their caches now

    def acquire(self, model: str, stack=None) -> RemoteSetup:
        key = self.key(model, stack)
        stack = list(stack) if isinstance(stack, (list, tuple)) else stack  # a composition row travels as it is
        return RemoteSetup(key, model, stack, self._engine.call("reserve", model, stack, key=key))

    def release(self, setup, served: bool = True) -> None:
        if isinstance(setup, RemoteSetup) and not setup.submitted:
            self._engine.send("release", setup.reservation.token, key=setup.key)


class RemoteHandle:
    """`RequestHandle` for a request running on a replica: its events as they stream in."""

    def __init__(self, engine: RemoteEngine, request: Request, on_done: Callable[[], None] | None):
        self.request = request
        self.submitted = time.monotonic()
        self.done = False
        self._engine = engine
        self._on_done = on_done
        self._cancelled = False
        self._stream = engine._generate(request, request.setup.reservation.token)

    def cancel(self) -> None:
        if self.done or self._cancelled:
            return
        self._cancelled = True
        self._stream.cancel()  # the replica's generator stops and frees its slot
        self._end()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def _end(self, last: Event | None = None) -> None:
        if self.done:
            return
        self.done = True
        hooks = self._engine.hooks
        if last is not None and hooks.finished is not None:
            hooks.finished(self.request, last.prompt_tokens or len(self.request.prompt_ids), last.completion_tokens)
        if self._on_done is not None:
            done, self._on_done = self._on_done, None
            done()

    async def __aiter__(self) -> AsyncIterator[Event]:
        received, retries, first = 0, 0, True
        while True:
            try:
                async for event in self._stream:
                    if first and event.token_ids and self._engine.hooks.first_token is not None:
                        first = False  # time to first token, end to end through the cluster
                        self._engine.hooks.first_token(self.request, time.monotonic() - self.submitted)
                    received += 1
                    last = event.finish_reason is not None or event.error is not None
                    if last:
                        self._end(event)
                    yield event
                    if last:
                        return
                error: AdapterRuntimeError = EngineUnavailable("the engine replica ended the stream early; retry")
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self._cancelled:
                    return
                if received == 0 and retries < STREAM_RETRIES and replica_died(e):
                    retries += 1  # nothing was sent: run it again elsewhere (same output)
                    log.warning("request %s: its replica died before answering; retrying", self.request.request_id)
                    self._stream = self._engine._generate(self.request, None)
                    continue
                error = failure(e, "the request")
                if received:
                    error = EngineUnavailable(f"the engine replica serving this request failed after {received} "
                                              f"events ({type(e).__name__}); the output is incomplete, retry the request")
            self._end()
            yield Event(error=error)
            return

    async def aresult(self) -> Completion:
        return collect([e async for e in self], self.request.params.logprobs is not None)
