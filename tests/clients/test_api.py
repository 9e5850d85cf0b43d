"""The client API is written once (clients/client.py `Api`): both clients have every operation
with the plan's signature, and send the same requests for the same calls (a recording
transport, no server)."""

from __future__ import annotations

import asyncio
import inspect
import json

import httpx

from clients.client import PLANS, STREAMS, AdapterServerClient, AsyncAdapterServerClient

ADAPTER = {"id": "a", "format": "peft", "method": "lora", "parameters": 1, "bytes": 2}
COMPLETION = {"id": "c", "model": "base", "created": 1, "choices": [{"index": 0, "text": "ok"}]}
ANSWERS = {  # path -> JSON answer
    "/health": {"status": "ok", "model": "base"}, "/v1/models": {"data": [{"id": "base", "created": 1, "owned_by": "me"}]},
    "/v1/completions": COMPLETION, "/v1/chat/completions": COMPLETION, "/v1/adapters/check": {"ok": True},
    "/v1/adapters": {"object": "list", "data": [ADAPTER]}, "/v1/adapters/register": ADAPTER, "/v1/adapters/a": ADAPTER,
    "/v1/merge": {"merged": None}, "/v1/merge/reset": {"merged": None},
}
STREAM = 'data: {"id": "c", "model": "base", "created": 1, "choices": [{"index": 0, "text": "hi"}]}\n\ndata: [DONE]\n\n'


def recorder(seen: list):
    def handle(request: httpx.Request) -> httpx.Response:
        body = request.read()
        streamed = request.headers.get("content-type") == "application/json" and json.loads(body).get("stream")
        seen.append((request.method, request.url.path, str(request.url.params), request.headers.get("authorization"),
                     body if not body.startswith(b"--") else len(body)))  # multipart: its boundary is random
        if request.method == "DELETE":
            return httpx.Response(200, json={"id": "a", "deleted": True})
        if streamed:
            return httpx.Response(200, text=STREAM)
        if (request.method, request.url.path) == ("POST", "/v1/adapters"):
            return httpx.Response(201, json=ADAPTER)
        return httpx.Response(200, json=ANSWERS[request.url.path])
    return handle


def test_both_clients_have_every_operation_with_its_signature():
    assert {"health", "complete", "stream", "chat", "upload_adapter", "delete_adapter", "merge", "reset"} <= set(PLANS)
    for name, plan in PLANS.items():
        sync, asynchronous = getattr(AdapterServerClient, name), getattr(AsyncAdapterServerClient, name)
        assert inspect.signature(sync) == inspect.signature(plan) == inspect.signature(asynchronous), name
        assert sync.__doc__ == plan.__doc__ == asynchronous.__doc__
        if name in STREAMS:
            assert inspect.isgeneratorfunction(sync) and inspect.isasyncgenfunction(asynchronous)
        else:
            assert inspect.iscoroutinefunction(asynchronous) and not inspect.iscoroutinefunction(sync)


def test_both_clients_send_the_same_requests(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    sync_seen, async_seen = [], []
    with AdapterServerClient("http://s", api_key="u", admin_key="k", transport=httpx.MockTransport(recorder(sync_seen))) as c:
        got = [c.health().status, c.complete("hi", max_tokens=2).text, [x.text for x in c.stream("hi")],
               c.chat([{"role": "user", "content": "hi"}]).text, c.upload_adapter("a", tmp_path).id,
               c.register_adapter("a", "/x").id, c.list_adapters()[0].id, c.get_adapter("a").id,
               c.delete_adapter("a").deleted, c.merge("a").merged, c.reset().merged]

    async def session():
        async with AsyncAdapterServerClient("http://s", api_key="u", admin_key="k",
                                            transport=httpx.MockTransport(recorder(async_seen))) as c:
            return [(await c.health()).status, (await c.complete("hi", max_tokens=2)).text,
                    [x.text async for x in c.stream("hi")], (await c.chat([{"role": "user", "content": "hi"}])).text,
                    (await c.upload_adapter("a", tmp_path)).id, (await c.register_adapter("a", "/x")).id,
                    (await c.list_adapters())[0].id, (await c.get_adapter("a")).id,
                    (await c.delete_adapter("a")).deleted, (await c.merge("a")).merged, (await c.reset()).merged]

    assert asyncio.run(session()) == got == ["ok", "ok", ["hi"], "ok", "a", "a", "a", "a", True, None, None]
    assert async_seen == sync_seen
    admin = {path for method, path, _, key, _ in sync_seen if key == "Bearer k"}
    assert admin == {"/v1/adapters/check", "/v1/adapters", "/v1/adapters/register", "/v1/adapters/a", "/v1/merge",
                     "/v1/merge/reset"}
    assert ("POST", "/v1/adapters", "name=a") == sync_seen[6][:3]  # the name in the query too
