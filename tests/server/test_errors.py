"""Error mapping (server/errors.py) and request validation, in-process with a fake engine: bad
input gets a clear 4xx in OpenAI's error shape naming the problem, never a bare 500, and is
refused before the engine sees it."""

from __future__ import annotations

import pytest

from adapter_runtime.errors import CapacityExceeded

PROMPT = [5, 17, 99, 230, 42]


def raw(body: bytes) -> dict:
    return {"content": body, "headers": {"content-type": "application/json"}}


def completion(**fields) -> dict:
    return {"json": {"model": "fake-base", "prompt": PROMPT, **fields}}


BAD_REQUESTS = {
    # case: (path, request keywords, status, words in the message)
    "unknown model": ("/v1/completions", {"json": {"model": "nope", "prompt": "hi"}}, 404, "'nope' not found"),
    "unknown adapter in a stack": ("/v1/completions", completion(adapters=["ghost"]), 404, "'ghost' not found"),
    "past the context": ("/v1/completions", completion(max_tokens=100), 400, "maximum context length 64"),
    "logprobs past 5": ("/v1/completions", completion(logprobs=9), 422, "logprobs"),
    "prompt with a lone surrogate": ("/v1/completions", raw(b'{"model": "fake-base", "prompt": "\\ud800"}'), 400,
                                     "surrogate"),
    "stop_token_ids negative": ("/v1/completions", completion(stop_token_ids=[-1]), 400, "stop_token_ids"),
    "stop_token_ids past the vocabulary": ("/v1/completions", completion(stop_token_ids=[300]), 400,
                                           "stop_token_ids"),
    "invalid JSON": ("/v1/completions", raw(b'{"model": x}'), 400, "not valid JSON"),
    "NaN temperature": ("/v1/completions", raw(b'{"model": "fake-base", "prompt": [1], "temperature": NaN}'), 422,
                        ""),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_clear_4xx_in_the_openai_shape(api, case):
    path, kwargs, status, words = BAD_REQUESTS[case]
    client = api()
    r = client.post(path, **kwargs)
    assert r.status_code == status and words in r.text, (case, r.status_code, r.text[:500])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] in (None, "temperature", "logprobs"), r.text  # a field name, never a character offset
    assert not client.engine.submitted


def test_a_validation_error_names_the_field(api):
    r = api().post("/v1/completions", **completion(logprobs=9))
    assert r.json()["error"]["param"] == "logprobs"


def test_an_unknown_model_is_not_echoed_back_whole(api):
    r = api().post("/v1/completions", json={"model": "m" * 1_000_000, "prompt": PROMPT})
    assert r.status_code == 404 and len(r.content) < 4000, len(r.content)


def test_an_overloaded_engine_answers_429_and_a_stopped_one_503(api):
    client = api()
    client.engine.failure = CapacityExceeded("the queue is full (max_queue=256); retry later")
    r = client.post("/v1/completions", **completion(max_tokens=2))
    assert r.status_code == 429 and "max_queue" in r.json()["error"]["message"]
    client.engine.running = False
    r = client.post("/v1/completions", **completion(max_tokens=2))
    assert r.status_code == 503 and "not running" in r.json()["error"]["message"]
    assert client.get("/health").status_code == 503
