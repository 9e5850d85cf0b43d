"""Fixtures shared across test modules."""

from __future__ import annotations

import pytest

from tests.support.live import ServerProcess
from tests.support.served import ADMIN_KEY, USER_KEY  # the README's clients quick start


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory):
    """`adapter-server serve --demo` on the embedded model with the README's two keys, one
    process for the session (the clients quick start and the dashboard tests use it; each
    leaves the adapters and the merge state as it found them)."""
    store = tmp_path_factory.mktemp("demo-store")
    server = ServerProcess("--demo", "--api-key", USER_KEY, "--admin-key", ADMIN_KEY, "--store-dir", str(store))
    yield server
    server.stop()
