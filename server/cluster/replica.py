"""The engine deployment of a cluster: one `Engine` with its adapter registry per replica.

The ingress (server/cluster/remote.py) calls these methods through a Ray Serve handle. Domain
errors come back as values (`Failed`), never as Ray task errors, so that the ingress raises the
very error the single-process server would (same type, same message, same HTTP status).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from adapter_runtime.engine import Event, Request
from adapter_runtime.errors import AdapterRuntimeError
from adapter_runtime.sampling import SamplingParams

from ..app import build_engine
from ..metrics import Metrics
from ..settings import Settings

log = logging.getLogger(__name__)
RESERVATION_TTL_S = 10.0  # a reserved setup that no `generate` claims is released after this


@dataclass(frozen=True)
class Failed:
    """A domain error, returned instead of raised (see the module docstring)."""

    error: AdapterRuntimeError


@dataclass(frozen=True)
class Description:
    """What the ingress needs to answer like an engine without one."""

    model_name: str
    info: Any  # ModelInfo
    tokenizer: Any
    max_seq_len: int
    config: Any  # EngineConfig
    merged: str | None
    replica: str


@dataclass(frozen=True)
class Reservation:
    """A request's adapters, acquired (pinned) on one replica until its `generate` claims them."""

    token: str
    replica: str
    extra_tokens: int  # KV entries the adapters add before the prompt (prefixes, soft prompts)


@dataclass
class Snapshot:
    """One replica's state, as the ingress' periodic sync collects it."""

    replica: str
    pid: int
    node: str
    engine: dict
    adapters: dict
    resident: list[str]
    merged: str | None
    metrics: bytes  # its Prometheus registry, text format
    device_hits: float  # adapter lookups that found the adapter on the device
    device_misses: float


class EngineReplica:
    def __init__(self, settings: Settings):
        from ray import serve

        self.settings = settings
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.metrics = Metrics(lambda: {**self.engine.stats(), "skipped": len(self.engine.registry.store.skipped)})
        threads = settings.threads or max(1, round(settings.replica_cpus))  # the replica's CPUs, not the node's
        self.engine = build_engine(settings.model_copy(update={"threads": threads}), self.metrics.engine_hooks(),
                                   self.metrics.cache_event)
        self.engine.registry.shared = True  # the other replicas write the same store
        self.engine.start()
        self._reserved: dict[str, tuple[tuple, float]] = {}  # token -> (setup, deadline)
        self._merge_version = -1  # of the last merge state applied (see `sync`)
        log.info("replica %s (pid %d) serves %s on %s", self.replica, os.getpid(), self.engine.model_name,
                 self.engine.device)

    async def __del__(self):
        await asyncio.to_thread(self.engine.stop, 30.0, self.settings.shutdown_grace_s)

    def check_health(self) -> None:
        """Ray Serve calls this periodically; a replica whose engine thread died is replaced."""
        if not self.engine.running and not self.engine.busy:
            raise RuntimeError("the engine is not running")

    def record_routing_stats(self) -> dict:
        """What the adapter-affinity router (routing.py) reads about this replica."""
        return {"resident": self.engine.registry.resident(), "capacity": self.engine.registry.limits.device_adapters}

    def describe(self) -> Description:
        e = self.engine
        return Description(e.model_name, e.info, e.tokenizer, e.max_seq_len, e.config, e.merged_name, self.replica)

    # ------------------------------------------------------------------ requests
    async def reserve(self, model: str, stack: list[str] | None) -> Reservation | Failed:
        """Acquire a request's adapters here (the device-cache lookup of the request)."""
        from adapter_runtime import layout

        self._release_expired()
        try:
            setup = await asyncio.to_thread(self.engine.registry.acquire, model, stack)
        except AdapterRuntimeError as e:
            return Failed(e)
        token = uuid.uuid4().hex
        self._reserved[token] = (setup, time.monotonic() + RESERVATION_TTL_S)
        lay = layout.row_layout(setup)
        return Reservation(token, self.replica, lay.prefix_len + lay.virtual_tokens)

    def release(self, token: str) -> None:
        held = self._reserved.pop(token, None)
        if held is not None:
            self.engine.registry.release(held[0], served=False)

    def _release_expired(self) -> None:
        now = time.monotonic()
        for token in [t for t, (_, deadline) in self._reserved.items() if deadline < now]:
            self.release(token)

    async def generate(self, token: str | None, model: str, stack: list[str] | None, prompt_ids: tuple[int, ...],
                       params: SamplingParams, request_id: str) -> AsyncIterator[Event]:
        """Run one engine request and stream its events. The adapters reserved under `token`
        are used when the reservation is here; otherwise (another replica took the call)
        they are acquired now."""
        held = self._reserved.pop(token, None) if token else None
        if held is not None:
            setup = held[0]
        else:
            try:
                setup = await asyncio.to_thread(self.engine.registry.acquire, model, stack)
            except AdapterRuntimeError as e:
                yield Event(error=e)
                return
        registry = self.engine.registry
        try:
            handle = self.engine.submit(Request(tuple(prompt_ids), params, setup, request_id),
                                        on_done=lambda: registry.release(setup))
        except AdapterRuntimeError as e:
            registry.release(setup, served=False)
            yield Event(error=e)
            return
        try:
            async for event in handle:
                yield event
        finally:
            handle.cancel()  # the ingress went away: free the slot (a no-op once finished)

    # ------------------------------------------------------------------ the registry
    async def registry(self, op: str, *args) -> Any:
        """names | models | status NAME | statuses | stats | check_free NAME | add NAME DIR FORMAT |
        delete NAME | forget NAME (drop a copy another replica deleted; a stat shows it is gone)."""
        registry = self.engine.registry
        try:
            if op == "forget":
                return await asyncio.to_thread(registry.refresh, *args)
            if op not in ("names", "models", "status", "statuses", "stats", "check_free", "add", "delete"):
                raise ValueError(f"unknown registry operation {op!r}")
            return await asyncio.to_thread(getattr(registry, op), *args)
        except AdapterRuntimeError as e:
            return Failed(e)

    # ------------------------------------------------------------------ merge / reset
    async def merge(self, name: str, version: int) -> str | Failed:
        try:
            merged = await asyncio.to_thread(self.engine.merge, name)
        except AdapterRuntimeError as e:
            return Failed(e)
        self._merge_version = max(self._merge_version, version)
        return merged

    async def reset(self, version: int) -> str | None:
        self._merge_version = max(self._merge_version, version)
        return await asyncio.to_thread(self.engine.reset)

    async def sync(self, merged: str | None, version: int) -> Snapshot:
        """Bring this replica to the cluster's merge state (a replacement replica starts
        unmerged) unless a newer merge or reset got here first; report its state."""
        self._release_expired()
        if version >= self._merge_version and merged != self.engine.merged_name:
            try:
                if self.engine.merged_name is not None:
                    await asyncio.to_thread(self.engine.reset)
                if merged is not None:
                    await asyncio.to_thread(self.engine.merge, merged)
                self._merge_version = version
            except AdapterRuntimeError as e:
                log.warning("cannot apply the cluster's merge state %r here: %s", merged, e)
        return self.snapshot()

    def snapshot(self) -> Snapshot:
        import ray

        read = self.metrics.registry.get_sample_value
        hits = read("adapter_server_adapter_cache_hits_total", {"tier": "device"}) or 0.0
        misses = read("adapter_server_adapter_cache_misses_total", {"tier": "device"}) or 0.0
        return Snapshot(self.replica, os.getpid(), ray.get_runtime_context().get_node_id(), self.engine.stats(),
                        self.engine.registry.stats(), self.engine.registry.resident(), self.engine.merged_name,
                        self.metrics.render(), hits, misses)
