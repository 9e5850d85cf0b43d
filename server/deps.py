"""What routes receive through `Depends`: the engine and the settings. Tests swap them with
`app.dependency_overrides` (a fake engine, other settings) without starting anything."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

from adapter_runtime.errors import EngineUnavailable

from .settings import Settings

if TYPE_CHECKING:  # the engine module loads torch; the CLI imports this before it needs torch
    from adapter_runtime.engine import Engine


def get_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None or not engine.running:
        raise EngineUnavailable("the engine is not running")
    return engine


def get_settings(request: Request) -> Settings:
    """The app's settings. An app without them fails closed (500), never open: the keys live here."""
    settings = getattr(request.app.state, "settings", None)
    if not isinstance(settings, Settings):
        raise RuntimeError("the app has no settings: build it with server.app.create_app(settings)")
    return settings
