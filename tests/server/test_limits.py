"""Request limits and request ids (server/limits.py, server/middleware.py), in-process with a
fake engine: each limit answers a clear 4xx naming the setting, before the engine sees the
request; concurrent requests past max_streams_per_key get 429 until theirs end."""

from __future__ import annotations

import io
import json
import logging
import threading

import pytest

from server.middleware import JsonFormatter, RequestIdFilter

LIMITS = dict(max_prompt_tokens=8, max_tokens_limit=1900, max_body_bytes=4096, max_stack_adapters=2,
              max_streams_per_key=2)


def refused(client, body: dict, status: int, words: str) -> None:
    r = client.post("/v1/completions", json={"model": "fake-base", **body})
    assert r.status_code == status and words in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("body,status,words", [
    ({"prompt": list(range(9))}, 400, "max_prompt_tokens=8"),
    ({"prompt": "x", "max_tokens": 1901}, 400, "max_tokens_limit=1900"),
    ({"prompt": "x", "adapters": ["p", "q", "r"]}, 400, "max_stack_adapters=2"),
    ({"prompt": "x" * 5000}, 413, "max_body_bytes=4096"),
    ({"prompt": "x" * 100, "max_tokens": 1}, 400, "limit of 64 (max_prompt_chars"),  # 8 x the token limit
])
def test_each_limit_answers_a_clear_4xx_before_the_engine(api, body, status, words):
    client = api(**LIMITS)
    refused(client, body, status, words)
    assert not client.engine.submitted


def test_a_body_without_content_length_is_cut_off_at_the_limit(api):
    client = api(**LIMITS)
    r = client.post("/v1/completions", content=iter([b'{"prompt": "', b"y" * 5000, b'"}']),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes" in r.text


def test_requests_past_max_streams_per_key_get_429_until_theirs_end(api):
    client = api(**LIMITS)
    client.engine.hold = True
    answers = []
    running = [threading.Thread(target=lambda: answers.append(client.post(
        "/v1/completions", json={"model": "fake-base", "prompt": "x", "max_tokens": 1}))) for _ in range(2)]
    for t in running:
        t.start()
    client.engine.wait_for_held(2)
    refused(client, {"prompt": "x", "max_tokens": 1}, 429, "max_streams_per_key=2")
    client.engine.hold = False
    client.engine.release()
    for t in running:
        t.join(10)
    assert [a.status_code for a in answers] == [200, 200]
    assert client.post("/v1/completions", json={"model": "fake-base", "prompt": "x", "max_tokens": 1}).status_code == 200


def test_n_choices_count_against_max_streams_per_key(api):
    refused(api(**LIMITS), {"prompt": "x", "max_tokens": 1, "n": 3}, 429, "max_streams_per_key=2")


def test_the_request_id_is_echoed_or_replaced_and_logged(api, caplog):
    client = api()
    with caplog.at_level(logging.INFO, logger="server.access"):
        r = client.post("/v1/completions", json={"model": "fake-base", "prompt": "Hi", "max_tokens": 2},
                        headers={"X-Request-ID": "trace-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
    assert client.engine.submitted[-1].request_id.startswith("trace-42")
    assert any("/v1/completions 200" in rec.getMessage() for rec in caplog.records)
    r = client.post("/v1/completions", json={"model": "ghost", "prompt": "Hi"}, headers={"X-Request-ID": "bad id\t!"})
    assert r.status_code == 404 and len(r.headers["x-request-id"]) == 32  # unsafe ids are replaced
    assert client.get("/nowhere").headers["x-request-id"]


def test_json_log_lines_carry_the_request_id(api):
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("server.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        api().post("/v1/completions", json={"model": "fake-base", "prompt": "Hi", "max_tokens": 2},
                   headers={"X-Request-ID": "trace-42"})
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert any(e["request_id"] == "trace-42" and "/v1/completions 200" in e["message"] for e in lines), lines
