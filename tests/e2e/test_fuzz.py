"""Fuzz every operation of the server's own OpenAPI spec (schemathesis, bounded) against a live
`python -m server serve` process: no 5xx, no crash, and it still answers afterwards."""

from __future__ import annotations

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from tests.support.live import start_server, stop_server  # noqa: E402

EXAMPLES = 25  # per operation and mode: bounded, a few seconds each


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    store = tmp_path_factory.mktemp("fuzz-store")
    proc, url = start_server("--max-seq-len", "64", "--max-batch", "8", "--store-dir", str(store),
                             "--max-upload-bytes", str(1 << 20))
    yield proc, url
    stop_server(proc)


def operations() -> list[tuple[str, str]]:
    """(method, path) of every documented operation, from the app's spec (no server needed)."""
    from server.app import create_app
    from server.settings import Settings

    spec = create_app(Settings()).openapi()
    return [(m.upper(), path) for path, ops in spec["paths"].items() for m in ops]


@pytest.fixture(scope="module")
def api_schema(live):
    return schemathesis.openapi.from_url(f"{live[1]}/openapi.json")


@pytest.mark.parametrize("method,path", operations())
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_server_errors(api_schema, live, method, path, mode):
    operation = api_schema[path][method]
    strategy = operation.as_strategy(schemathesis.GenerationMode(mode))

    @given(strategy)
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def call(case):
        response = case.call(timeout=30)
        assert response.status_code < 500, (case.method, case.path, case.body, response.text)
        assert response.headers.get("x-request-id"), "every response carries a request id"

    try:
        call()
    except Unsatisfiable:  # nothing to break: an operation without parameters or body
        assert mode == "negative"
    assert live[0].poll() is None, "the server crashed"


def test_still_answers_after_the_fuzz(live):
    proc, url = live
    assert proc.poll() is None
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    r = httpx.post(f"{url}/v1/completions", timeout=30,
                   json={"model": "tiny-llama-embedded", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
