"""The app factory. The engine is built (or injected) in the lifespan, never at import."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import fields
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from adapter_runtime import engine as runtime
from adapter_runtime.engine import Engine, EngineConfig, EngineHooks
from adapter_runtime.registry import CacheLimits
from adapter_runtime.store import AdapterStore, BaseIdentity, StoreLimits

from . import auth, errors, routes, routes_adapters, routes_chat, routes_compose, routes_merge, routes_tokenize
from .demo import demo_adapters
from .limits import StreamLimiter
from .metrics import Metrics
from .middleware import RequestContext
from .settings import Settings

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).with_name("static")  # the dashboard (plain HTML/JS/CSS, no build step)


def engine_config(settings: Settings) -> EngineConfig:
    """The engine's configuration: the fields it shares with the settings, taken by name."""
    shared = {f.name: getattr(settings, f.name) for f in fields(EngineConfig) if f.name in Settings.model_fields}
    return EngineConfig(**shared, bank_slots=max(settings.max_batch, settings.device_cache_adapters))


def build_engine(settings: Settings, hooks: EngineHooks = EngineHooks(), cache_observer=None) -> Engine:
    """The engine `settings` describe (not started), reporting to `hooks` / `cache_observer`,
    serving the adapter store at `settings.store_dir` with the configured cache limits."""
    adapters = (*demo_adapters(), *settings.adapters) if settings.demo else settings.adapters
    engine = runtime.build_engine(settings.model, dtype=settings.dtype, device=settings.device,
                                  config=engine_config(settings), adapters=adapters, hooks=hooks,
                                  cache_observer=cache_observer)
    store = AdapterStore(settings.store_dir, engine.info, StoreLimits(settings.max_lora_rank, settings.max_prefix_len),
                         BaseIdentity.of(engine.model_name, engine.model))
    limits = CacheLimits(settings.device_cache_adapters, settings.device_cache_bytes, settings.host_cache_bytes)
    engine.registry.attach(store, limits)  # after the startup adapters: their names come first
    return engine


def create_app(settings: Settings | None = None, engine: Engine | None = None, metrics: Metrics | None = None) -> FastAPI:
    """An app serving `engine` (started and stopped with the app), or one built from `settings`
    in the lifespan. An injected engine reports to `metrics` (built with `metrics.engine_hooks()`)."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        eng = engine if engine is not None else build_engine(settings, app.state.metrics.engine_hooks(),
                                                             app.state.metrics.cache_event)
        app.state.chat_template = routes_chat.load_chat_template(settings.chat_template, eng.tokenizer)
        app.state.engine = eng.start()
        log.info("serving %s (%d adapters) on %s, max_batch %d, max_seq_len %d", eng.model_name,
                 len(eng.registry.names()), eng.device, eng.config.max_batch, eng.max_seq_len)
        log.info("API keys: %s", auth.describe_keys(settings))
        try:
            yield
        finally:
            await asyncio.to_thread(eng.stop, 30.0, settings.shutdown_grace_s)
            if eng.registry.store is not None:
                eng.registry.store.sweep()  # writes are atomic renames; drop any half-written temp folder

    app = FastAPI(title="adapter-server", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.created = int(time.time())  # /v1/models' `created` of the base model
    app.state.metrics = metrics or Metrics(lambda: engine_state(getattr(app.state, "engine", None)))
    app.state.limiter = StreamLimiter(settings.max_streams_per_key)
    app.add_middleware(RequestContext, metrics=app.state.metrics, max_body_bytes=settings.max_body_bytes)
    errors.install(app)
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=True,
                      dependencies=[Depends(auth.metrics)])
    app.include_router(routes.router)
    app.include_router(routes_adapters.router)
    app.include_router(routes_merge.router)
    app.include_router(routes_compose.router)
    app.include_router(routes_chat.router)
    app.include_router(routes_tokenize.router)
    app.mount("/ui", DashboardFiles(directory=STATIC_DIR, html=True), name="ui")
    app.add_api_route("/", lambda: RedirectResponse("/ui/"), methods=["GET"], include_in_schema=False)
    return app


class DashboardFiles(StaticFiles):
    """The dashboard at /ui. It only talks to this server's own API, so its policy allows
    scripts, styles and requests from this origin only (no inline code)."""

    POLICY = ("default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
              "frame-ancestors 'none'; form-action 'none'")

    async def get_response(self, path: str, scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Content-Security-Policy"] = self.POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def engine_state(engine: Engine | None) -> dict:
    """What the metrics' gauges read at scrape time ({} before the engine starts)."""
    if engine is None:
        return {}
    store = engine.registry.store
    return {**engine.stats(), "skipped": len(store.skipped) if store is not None else 0}


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus text format. It names adapters, so with keys configured it needs one (the
    metrics key, made for scrapers, or the inference or admin key); open without keys."""
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=metrics.content_type)
