"""The app factory. The engine is built (or injected) in the lifespan, never at import."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from . import auth, errors, routes, routes_adapters, routes_chat, routes_compose, routes_merge, routes_tokenize
from .limits import StreamLimiter
from .metrics import Metrics
from .middleware import RequestContext
from .settings import Settings

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).with_name("static")  # the dashboard (plain HTML/JS/CSS, no build step)


def build_engine(settings: Settings):
    from adapter_runtime.engine import EngineConfig, build_engine

    config = EngineConfig(max_batch=settings.max_batch, max_seq_len=settings.max_seq_len, max_queue=settings.max_queue,
                          compile=settings.compile, token_budget=settings.token_budget,
                          bank_slots=max(settings.max_batch, settings.device_cache_adapters))
    adapters = settings.adapters
    if settings.demo:
        from .demo import demo_adapters

        adapters = (*demo_adapters(), *adapters)
    engine = build_engine(settings.model, settings.dtype, settings.device, config, adapters)
    attach_store(engine, settings)
    return engine


def attach_store(engine, settings: Settings) -> None:
    """Serve the adapter store at `settings.store_dir` with the configured cache limits."""
    from adapter_runtime.registry import CacheLimits
    from adapter_runtime.store import AdapterStore, StoreLimits

    from adapter_runtime.store import BaseIdentity

    store = AdapterStore(settings.store_dir, engine.info, StoreLimits(settings.max_lora_rank, settings.max_prefix_len),
                         BaseIdentity.of(engine.model_name, engine.model))
    limits = CacheLimits(settings.device_cache_adapters, settings.device_cache_bytes, settings.host_cache_bytes)
    engine.registry.attach(store, limits)


def create_app(settings: Settings | None = None, engine=None) -> FastAPI:
    """An app serving `engine` (started and stopped with the app), or one built from `settings`."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        eng = engine if engine is not None else build_engine(settings)
        app.state.chat_template = routes_chat.load_chat_template(settings.chat_template, eng.tokenizer)
        app.state.metrics.attach(eng)
        app.state.engine = eng.start()
        app.state.created = int(time.time())
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
    app.state.metrics = Metrics(lambda: engine_state(app))
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


def engine_state(app: FastAPI) -> dict:
    """What the metrics' gauges read at scrape time ({} before the engine starts)."""
    engine = getattr(app.state, "engine", None)
    if engine is None:
        return {}
    store = engine.registry.store
    return {**engine.stats(), "skipped": len(store.skipped) if store is not None else 0}


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus text format. It names adapters, so with keys configured it needs one (the
    metrics key, made for scrapers, or the inference or admin key); open without keys."""
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=metrics.content_type)
