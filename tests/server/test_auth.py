"""API keys (server/auth.py), in-process with a fake engine: which key opens which route, the
401/403 messages, /metrics, the open localhost-only mode, and an app without settings failing
closed. A refused request never reaches the engine."""

from __future__ import annotations

import pytest
from fastapi.routing import APIRoute

from server import auth, routes, routes_adapters, routes_chat, routes_compose, routes_merge, routes_tokenize
from server.app import create_app
from server.auth import bind_host, describe_keys
from server.settings import Settings

USER, ADMIN, METRICS = "user-key", "admin-key", "metrics-key"
INFERENCE_ROUTES = [("GET", "/v1/models"), ("GET", "/v1/models/fake-base"), ("GET", "/v1/adapters"),
                    ("GET", "/v1/merge"), ("POST", "/v1/completions"), ("POST", "/tokenize")]
ADMIN_ROUTES = [("POST", "/v1/merge/reset"), ("POST", "/v1/merge"), ("DELETE", "/v1/adapters/x"),
                ("POST", "/v1/adapters/check"), ("POST", "/v1/adapters"), ("POST", "/v1/adapters/register"),
                ("POST", "/v1/adapters/average"), ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter")]
BODIES = {"/v1/completions": {"model": "fake-base", "prompt": [1, 2], "max_tokens": 2}, "/tokenize": {"prompt": "hi"}}


def call(client, method: str, path: str, key: str | None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.request(method, path, headers=headers, json=BODIES.get(path))


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_every_route_but_health_and_version_needs_a_key():
    routers = (routes.router, routes_adapters.router, routes_chat.router, routes_compose.router, routes_merge.router,
               routes_tokenize.router)
    open_routes = set()
    for route in [r for router in routers for r in router.routes] + create_app(Settings()).routes:
        if isinstance(route, APIRoute) and route.include_in_schema:
            guards = {d.call for d in route.dependant.dependencies}
            if not guards & {auth.inference, auth.admin, auth.metrics}:
                open_routes.add(route.path)
    assert open_routes == {"/health", "/version"}


@pytest.mark.parametrize("method,path", INFERENCE_ROUTES)
def test_inference_routes_take_either_key(api, method, path):
    client = api(api_key=USER, admin_key=ADMIN)
    for key in (None, "wrong"):
        r = call(client, method, path, key)
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]["message"], r.text
    assert not client.engine.submitted
    for key in (USER, ADMIN):
        assert call(client, method, path, key).status_code == 200


@pytest.mark.parametrize("method,path", ADMIN_ROUTES)
def test_admin_routes_take_only_the_admin_key(api, method, path):
    client = api(api_key=USER, admin_key=ADMIN)
    assert call(client, method, path, None).status_code == 401
    assert call(client, method, path, "wrong").status_code == 401
    r = call(client, method, path, USER)
    assert r.status_code == 403 and "needs the admin key" in r.json()["error"]["message"]
    assert call(client, method, path, ADMIN).status_code not in (401, 403)  # past the keys (the body decides)
    disabled = api(api_key=USER)
    r = call(disabled, method, path, None)
    assert r.status_code == 403 and "no admin key is configured" in r.json()["error"]["message"]


def test_metrics_take_any_key_when_keys_are_configured_and_health_is_open(api):
    client = api(api_key=USER, admin_key=ADMIN, metrics_key=METRICS)
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=bearer("wrong")).status_code == 401
    for key in (METRICS, USER, ADMIN):
        r = client.get("/metrics", headers=bearer(key))
        assert r.status_code == 200 and "adapter_server_http_requests_total" in r.text
    assert client.get("/v1/models", headers=bearer(METRICS)).status_code == 401  # the metrics key reads /metrics only
    assert client.get("/health").status_code == 200
    assert api(metrics_key=METRICS).get("/metrics").status_code == 401  # a metrics key alone closes /metrics


def test_without_keys_everything_is_open(api):
    client = api()
    for method, path in INFERENCE_ROUTES + [("POST", "/v1/merge/reset"), ("GET", "/metrics")]:
        assert call(client, method, path, None).status_code == 200, path


def test_an_app_without_settings_fails_closed(api):
    """Before, auth fell back to an open `Settings()` when the app had none: every route
    answered without a key. Now such an app answers 500 and reaches nothing."""
    client = api(api_key=USER, admin_key=ADMIN)
    del client.app.state.settings
    for method, path in INFERENCE_ROUTES + ADMIN_ROUTES:
        assert call(client, method, path, None).status_code == 500, path
    assert not client.engine.submitted and client.engine.merged_name is None


def test_without_keys_the_server_binds_to_localhost_and_says_so(caplog):
    assert bind_host(Settings(host="0.0.0.0")).host == "127.0.0.1"
    assert "binds to 127.0.0.1 only" in caplog.text
    assert bind_host(Settings(host="0.0.0.0", admin_key="k")).host == "0.0.0.0"


def test_the_key_summary_names_keys_but_never_shows_them():
    text = describe_keys(Settings(api_key=USER, admin_key=ADMIN, metrics_key=METRICS))
    assert text == "inference key configured, admin key configured, metrics key configured"
    assert "WARNING" in describe_keys(Settings(api_key=USER, admin_key=USER))
    assert "admin endpoints are disabled" in describe_keys(Settings(api_key=USER))
