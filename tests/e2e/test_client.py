"""The Python client (sync and async) against a real `python -m server serve` process:
every endpoint, streaming and errors. Generations are checked against transformers (base)
and PEFT itself (the uploaded LoRA), never against the server's own output."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from safetensors.torch import load_file

from clients import (AdapterServerClient, AsyncAdapterServerClient, AuthError, BadRequest, Conflict, ConnectionFailed,
                     NotFound, pack_directory)
from tests.support.live import free_port
from tests.support.oracles import greedy_ids
from tests.support.served import ADMIN_KEY, PROMPT, USER_KEY, base_hf
from tests.support.tiny import decode

GREEDY = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture
def live(keyed_server):
    """(server url, LoRA directory, expected base text, expected LoRA text)."""
    url, tmp, expect_base, expect_lora = keyed_server
    return url, tmp / "my-lora", expect_base, expect_lora


@pytest.fixture
def client(live):
    with AdapterServerClient(live[0], api_key=ADMIN_KEY, timeout=60) as c:
        yield c


def test_health_and_models(client):
    h = client.health()
    assert (h.status, h.model) == ("ok", "tiny-llama")
    assert [m.id for m in client.models() if m.parent is None] == ["tiny-llama"]
    assert client.base_model() == "tiny-llama"


def test_completion_stream_and_logprobs_match_transformers(client, live):
    _, _, expect_base, _ = live
    r = client.complete(PROMPT, **GREEDY)
    assert r.text == expect_base and r.model == "tiny-llama"
    assert r.choices[0].finish_reason == "length" and (r.usage.prompt_tokens, r.usage.completion_tokens) == (5, 8)

    chunks = list(client.stream(PROMPT, **GREEDY))
    assert len(chunks) > 1 and "".join(c.text for c in chunks) == expect_base
    assert chunks[-1].choices[0].finish_reason == "length"

    scored = client.complete(PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = scored.choices[0].logprobs
    with torch.no_grad():
        ref = torch.log_softmax(base_hf()(torch.tensor([PROMPT])).logits[0], -1)
    want = ref[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])]
    assert lp.token_logprobs[0] is None and torch.allclose(torch.tensor(lp.token_logprobs[1:]), want, atol=1e-4)


def test_adapter_lifecycle_upload_merge_reset_delete(client, live, tmp_path):
    _, lora, expect_base, expect_lora = live
    sent: list[tuple[int, int]] = []
    info = client.upload_adapter("lora-a", lora, progress=lambda done, total: sent.append((done, total)))
    assert sent and sent[-1][0] == sent[-1][1] > 0
    lora_params = sum(v.numel() for v in load_file(lora / "adapter_model.safetensors").values())
    assert (info.id, info.format, info.method, info.parameters) == ("lora-a", "peft", "lora", lora_params)
    assert info.bytes > 0 and not info.merged

    assert "lora-a" in [a.id for a in client.list_adapters()]
    assert client.get_adapter("lora-a").id == "lora-a"
    assert "lora-a" in [m.id for m in client.models()]
    with pytest.raises(Conflict, match="lora-a"):
        client.upload_adapter("lora-a", lora)

    assert client.complete(PROMPT, model="lora-a", **GREEDY).text == expect_lora
    assert client.complete(PROMPT, adapters=["lora-a"], **GREEDY).text == expect_lora
    assert "".join(c.text for c in client.stream(PROMPT, model="lora-a", **GREEDY)) == expect_lora

    files = client.download_adapter("lora-a", tmp_path / "copy")
    assert json.loads((files / "adapter_config.json").read_text())["r"] == 4

    assert client.merged().merged is None
    assert client.merge("lora-a").merged == "lora-a"
    assert client.merged().merged == "lora-a" and client.get_adapter("lora-a").merged
    assert client.complete(PROMPT, model="lora-a", **GREEDY).text == expect_lora
    assert client.complete(PROMPT, **GREEDY).text == expect_base
    assert client.reset().merged is None and client.merged().merged is None
    assert client.complete(PROMPT, **GREEDY).text == expect_base

    deleted = client.delete_adapter("lora-a")
    assert (deleted.id, deleted.deleted) == ("lora-a", True)
    with pytest.raises(NotFound, match="lora-a"):
        client.get_adapter("lora-a")
    with pytest.raises(NotFound):
        client.delete_adapter("lora-a")


def test_register_a_server_side_directory(client, live):
    _, lora, _, expect_lora = live
    info = client.register_adapter("lora-reg", str(lora), format="peft")
    assert (info.id, info.method) == ("lora-reg", "lora")
    assert client.complete(PROMPT, model="lora-reg", **GREEDY).text == expect_lora
    assert client.delete_adapter("lora-reg").deleted


def test_errors_carry_the_server_message(client, live, tmp_path):
    with pytest.raises(NotFound, match="no-such-adapter") as e:
        client.complete("hi", model="no-such-adapter", max_tokens=2)
    assert e.value.status == 404 and e.value.message and e.value.type == "invalid_request_error"
    with pytest.raises(NotFound, match="ghost"):
        list(client.stream("hi", adapters=["ghost"], max_tokens=2))
    with pytest.raises(BadRequest, match="maximum context length 64") as e:
        client.complete("hi", max_tokens=100)
    assert e.value.status == 400
    with pytest.raises(BadRequest) as e:
        client.complete("hi", logprobs=9)
    assert (e.value.status, e.value.param) == (422, "logprobs")
    with pytest.raises(NotFound):
        client.merge("ghost")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    before = [a.id for a in client.list_adapters()]
    with pytest.raises(BadRequest) as e:
        client.upload_adapter("broken", broken)
    assert e.value.status in (400, 422) and e.value.message
    assert [a.id for a in client.list_adapters()] == before

    with AdapterServerClient(f"http://127.0.0.1:{free_port()}", timeout=5) as dead:
        with pytest.raises(ConnectionFailed):
            dead.health()


def test_api_keys(live):
    url, lora, _, _ = live
    with AdapterServerClient(url, api_key="wrong", timeout=30) as c:
        with pytest.raises(AuthError) as e:
            c.list_adapters()
        assert e.value.status == 401 and e.value.message
    with AdapterServerClient(url, api_key=USER_KEY, timeout=30) as c:
        assert c.complete(PROMPT, max_tokens=1).choices
        with pytest.raises(AuthError):
            c.upload_adapter("not-allowed", lora)


def test_api_key_defaults_to_the_environment(live, monkeypatch):
    monkeypatch.delenv("ADAPTER_SERVER_API_KEY", raising=False)
    monkeypatch.setenv("ADAPTER_CLIENT_API_KEY", USER_KEY)
    monkeypatch.setenv("ADAPTER_CLIENT_URL", live[0])
    with AdapterServerClient(timeout=30) as c:
        assert c.base_url == live[0] and c.models()


def test_async_client_covers_the_same_api(live, tmp_path):
    url, lora, expect_base, expect_lora = live
    archive = pack_directory(lora, tmp_path / "my-lora.tar.gz")

    async def session() -> None:
        async with AsyncAdapterServerClient(url, api_key=ADMIN_KEY, timeout=60) as c:
            assert (await c.health()).status == "ok" and await c.base_model() == "tiny-llama"
            assert (await c.complete(PROMPT, **GREEDY)).text == expect_base
            sent: list[int] = []
            info = await c.upload_adapter("lora-async", archive, progress=lambda done, total: sent.append(done))
            assert info.id == "lora-async" and sent
            assert "lora-async" in [a.id for a in await c.list_adapters()]
            assert (await c.get_adapter("lora-async")).method == "lora"
            text = "".join([chunk.text async for chunk in c.stream(PROMPT, model="lora-async", **GREEDY)])
            assert text == expect_lora
            assert (await c.merge("lora-async")).merged == "lora-async"
            assert (await c.merged()).merged == "lora-async"
            assert (await c.reset()).merged is None
            assert (await c.download_adapter("lora-async", tmp_path / "dl") / "adapter_config.json").exists()
            assert (await c.delete_adapter("lora-async")).deleted
            with pytest.raises(NotFound):
                await c.get_adapter("lora-async")
            with pytest.raises(BadRequest):
                await c.complete("hi", max_tokens=100)
            reg = await c.register_adapter("lora-async-reg", str(lora))
            assert (await c.delete_adapter(reg.id)).deleted

    asyncio.run(session())


def test_zip_upload(client, live, tmp_path):
    _, lora, _, expect_lora = live
    info = client.upload_adapter("lora-zip", pack_directory(lora, tmp_path / "lora.zip"), format="peft")
    assert info.method == "lora" and client.complete(PROMPT, model="lora-zip", **GREEDY).text == expect_lora
    assert client.delete_adapter("lora-zip").deleted


def test_stream_lines_and_error_chunks():
    """A failure after the stream started arrives as an error chunk; it raises like a response would."""
    from clients.client import RateLimited, ServerError, parse_sse_line

    assert parse_sse_line("data: [DONE]") is None and parse_sse_line(": keep-alive") is None and parse_sse_line("") is None
    chunk = parse_sse_line('data: {"id": "c", "model": "m", "created": 1, "choices": [{"index": 0, "text": "hi"}]}')
    assert chunk.text == "hi" and chunk.choices[0].finish_reason is None
    with pytest.raises(ServerError, match="engine died") as e:
        parse_sse_line('data: {"error": {"message": "engine died", "type": "server_error", "param": null, "code": null}}')
    assert e.value.status == 500 and e.value.type == "server_error"
    with pytest.raises(RateLimited):
        parse_sse_line('data: {"error": {"message": "full", "type": "rate_limit_error", "code": "queue_full"}}')


def test_chat_sync_stream_and_async(client, live):
    """chat / chat_stream: the reply equals transformers' greedy run on the templated ids."""
    from adapter_runtime.tokenizer import build_byte_tokenizer

    messages = [{"role": "user", "content": "Hello"}]
    ids = list(build_byte_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    expect = decode(greedy_ids(base_hf(), ids, 8))
    r = client.chat(messages, logprobs=True, **GREEDY)
    assert r.text == expect and r.usage.prompt_tokens == len(ids) and len(r.choices[0].logprobs.token_logprobs) == 8
    assert "".join(c.text for c in client.chat_stream(messages, **GREEDY)) == expect

    async def session() -> str:
        async with AsyncAdapterServerClient(live[0], api_key=USER_KEY, timeout=60) as c:
            assert "".join([chunk.text async for chunk in c.chat_stream(messages, **GREEDY)]) == expect
            return (await c.chat(messages, **GREEDY)).text

    assert asyncio.run(session()) == expect
