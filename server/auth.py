"""API keys: an inference key and an admin key, sent as `Authorization: Bearer KEY`.

Inference endpoints accept either key, admin endpoints only the admin key (401 for a missing
or unknown key, 403 for the inference key on an admin endpoint). /metrics accepts the metrics
key (`--metrics-key`), the inference key or the admin key, and is open only when no key at all
is configured. /health is always open. With no inference or admin key configured everything
is open, and the server binds to 127.0.0.1 only (`bind_host`).
"""

from __future__ import annotations

import hmac
import logging
from fastapi import Depends, Request

from adapter_runtime.errors import Forbidden, Unauthorized

from .deps import get_settings
from .settings import Settings

log = logging.getLogger(__name__)
LOCALHOST = "127.0.0.1"


def bind_host(settings: Settings) -> Settings:
    """Without any key the API is open, so it must not be reachable from other machines."""
    if settings.api_key or settings.admin_key:
        return settings
    log.warning("no API keys configured (--api-key / --admin-key): the API is open to anyone who can reach it, "
                "so the server binds to %s only%s", LOCALHOST,
                f" (ignoring host {settings.host})" if settings.host != LOCALHOST else "")
    return settings.model_copy(update={"host": LOCALHOST})


def describe_keys(settings: Settings) -> str:
    """Which keys are configured, for the start-up log (never the keys themselves)."""
    def state(key: str | None) -> str:
        return "configured" if key else "not configured"

    text = (f"inference key {state(settings.api_key)}, admin key {state(settings.admin_key)}, "
            f"metrics key {state(settings.metrics_key)}")
    if settings.api_key and settings.api_key == settings.admin_key:
        text += " (WARNING: the inference key equals the admin key: every client can administer the server)"
    if settings.api_key and not settings.admin_key:
        text += " (admin endpoints are disabled without an admin key)"
    return text


def _presented(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and hmac.compare_digest(a.encode(), b.encode())


def inference(request: Request, s: Settings = Depends(get_settings)) -> None:
    """Dependency of inference endpoints: either key."""
    if not (s.api_key or s.admin_key):
        return
    key = _presented(request)
    if not (_same(key, s.api_key) or _same(key, s.admin_key)):
        raise Unauthorized("missing or invalid API key: send `Authorization: Bearer KEY`")


def admin(request: Request, s: Settings = Depends(get_settings)) -> None:
    """Dependency of admin endpoints (uploads, deletes, merges): the admin key only."""
    if not (s.api_key or s.admin_key):
        return
    key = _presented(request)
    if _same(key, s.admin_key):
        return
    if _same(key, s.api_key):
        raise Forbidden("this endpoint needs the admin key; the inference key is not enough")
    if not s.admin_key:
        raise Forbidden("admin endpoints are disabled: no admin key is configured (--admin-key)")
    raise Unauthorized("missing or invalid admin key: send `Authorization: Bearer ADMIN_KEY`")


def metrics(request: Request, s: Settings = Depends(get_settings)) -> None:
    """Dependency of /metrics: any configured key (metrics, inference or admin); open without keys."""
    keys = [k for k in (s.metrics_key, s.api_key, s.admin_key) if k]
    if not keys:
        return
    key = _presented(request)
    if not any(_same(key, k) for k in keys):
        raise Unauthorized("/metrics needs a key when the server has keys: send `Authorization: Bearer KEY` with the "
                           "metrics, inference or admin key")
