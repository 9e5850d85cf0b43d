"""The app in-process (FastAPI's TestClient) with a fake engine through dependency overrides:
what the HTTP layer decides, without a model or a server process."""

from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import ENV_PREFIX, Settings
from tests.support.fake_engine import FakeEngine


@pytest.fixture(autouse=True)
def no_server_variables(monkeypatch):
    """`Settings(...)` reads ADAPTER_SERVER_* variables (pydantic-settings): none from the shell
    that runs the tests may change what these tests configure."""
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)


@pytest.fixture
def api():
    """make(engine=None, **settings) -> a TestClient for a fresh app with these settings serving
    `engine` (a new FakeEngine by default; `client.engine`), put where the lifespan would put a
    started engine, so the routes' `get_engine` dependency (not overridden) checks it is
    running. The lifespan does not run: nothing is built or started."""
    clients = []

    def make(engine: FakeEngine | None = None, **settings) -> TestClient:
        engine = engine or FakeEngine()
        app = create_app(Settings(**settings))
        app.state.engine = engine
        client = TestClient(app, raise_server_exceptions=False)
        client.engine = engine
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.engine.release()
        client.close()
