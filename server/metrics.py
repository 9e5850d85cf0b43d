"""Prometheus metrics of one app instance (its own CollectorRegistry, never the global one).

The engine and the adapter registry know nothing of Prometheus: they are built with plain
callbacks (`engine_hooks()`, `cache_event`) that this module provides. Gauges that describe
the engine's present state (queue depth, running requests) are read at scrape time.

    adapter_server_http_requests_total{method,route,status}
    adapter_server_http_request_duration_seconds{method,route}      histogram, until the last body byte
    adapter_server_time_to_first_token_seconds                      histogram, submit -> first token
    adapter_server_prompt_tokens_total / adapter_server_completion_tokens_total
    adapter_server_engine_requests_total                           engine requests that ended
    adapter_server_queue_depth / adapter_server_running_requests     gauges, read from engine.stats()
    adapter_server_adapter_requests_total{adapter}                  engine requests per adapter of the stack
                                                                    (or the base model's name)
    adapter_server_adapter_cache_hits_total{tier} / ..._misses_total{tier}   tier: device | host
    adapter_server_adapter_loads_total{source} / adapter_server_adapter_load_seconds{source}
    adapter_server_adapter_cache_evictions_total{tier}
    adapter_server_store_skipped_adapters                           unreadable folders at the last start
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from adapter_runtime.engine import EngineHooks

PREFIX = "adapter_server_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, state: Callable[[], dict] = dict):
        """`state()` returns the engine's present stats ({} when no engine runs)."""
        self.registry = CollectorRegistry(auto_describe=True)
        r, p = self.registry, PREFIX
        self.http_requests = Counter(p + "http_requests", "HTTP requests answered", ["method", "route", "status"], registry=r)
        self.http_latency = Histogram(p + "http_request_duration_seconds", "HTTP request latency (until the last byte)",
                                      ["method", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "time from submit to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "prompt tokens of engine requests that ended", registry=r)
        self.completion_tokens = Counter(p + "completion_tokens", "generated tokens", registry=r)
        self.engine_requests = Counter(p + "engine_requests", "engine requests that ended (finished or failed)", registry=r)
        self.adapter_requests = Counter(p + "adapter_requests", "completion requests per model or adapter", ["adapter"],
                                        registry=r)
        self.cache_hits = Counter(p + "adapter_cache_hits", "adapter lookups found in a cache tier", ["tier"], registry=r)
        self.cache_misses = Counter(p + "adapter_cache_misses", "adapter lookups not in a cache tier", ["tier"], registry=r)
        self.loads = Counter(p + "adapter_loads", "adapters loaded onto the device", ["source"], registry=r)
        self.load_seconds = Histogram(p + "adapter_load_seconds", "time to load an adapter onto the device", ["source"],
                                      buckets=LOAD_BUCKETS, registry=r)
        self.evictions = Counter(p + "adapter_cache_evictions", "adapters evicted from a cache tier", ["tier"], registry=r)
        self._gauge("queue_depth", "engine requests waiting for a slot", lambda: state().get("waiting", 0))
        self._gauge("running_requests", "engine requests being decoded", lambda: state().get("running", 0))
        self._gauge("store_skipped_adapters", "store folders skipped as unreadable at start",
                    lambda: state().get("skipped", 0))

    def _gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        Gauge(PREFIX + name, doc, registry=self.registry).set_function(read)

    # ------------------------------------------------------------------ callbacks
    def engine_hooks(self) -> EngineHooks:
        """What an engine built for this app reports to (pass it to the engine's constructor)."""
        return EngineHooks(first_token=self.first_token, finished=self.finished)

    def first_token(self, request, seconds: float) -> None:
        self.ttft.observe(seconds)

    def finished(self, request, prompt_tokens: int, completion_tokens: int) -> None:
        self.engine_requests.inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)

    def cache_event(self, event: str, tier: str, seconds: float = 0.0) -> None:
        if event == "hit":
            self.cache_hits.labels(tier).inc()
        elif event == "miss":
            self.cache_misses.labels(tier).inc()
        elif event == "load":
            self.loads.labels(tier).inc()
            self.load_seconds.labels(tier).observe(seconds)
        elif event == "evict":
            self.evictions.labels(tier).inc()

    def http_done(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_latency.labels(method, route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
