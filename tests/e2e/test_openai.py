"""The OpenAI/vLLM surface beyond completions, through the official `openai` SDK and httpx
against a real `python -m server serve` process: chat completions (checked against
transformers and PEFT on the same templated token ids), n and best_of, penalties over HTTP,
models.retrieve, /tokenize, /detokenize, /tokenizer_info, /version and the refused fields.
(lm-evaluation-harness against the same server: tests/e2e/test_ecosystem.py.)"""

from __future__ import annotations


import httpx
import openai
import pytest
import torch

from adapter_runtime.sampling import SamplingParams
from tests.support.oracles import greedy_ids, reference_generate
from tests.support.served import base_hf
from tests.support.tiny import EOS, decode

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
GREEDY = {"max_tokens": 8, "temperature": 0, "extra_body": {"ignore_eos": True}}


def templated(tok, messages=MESSAGES) -> list[int]:
    """The oracle's prompt: transformers' apply_chat_template on the checkpoint's tokenizer."""
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


# ---------------------------------------------------------------------- chat
def test_chat_equals_transformers_and_peft_on_the_templated_ids(chat_server):
    _, client, hf, peft, tok = chat_server
    ids = templated(tok)
    expect_base, expect_lora = decode(greedy_ids(hf, ids, 8)), decode(greedy_ids(peft, ids, 8))
    assert expect_base != expect_lora  # the adapter changes the output, so the comparison means something
    r = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, **GREEDY)
    assert r.choices[0].message.content == expect_base and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.object == "chat.completion"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 8)
    r = client.chat.completions.create(model="my-lora", messages=MESSAGES, **GREEDY)
    assert r.choices[0].message.content == expect_lora
    r = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_completion_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True, "adapters": ["my-lora"]})
    assert r.choices[0].message.content == expect_lora
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, MESSAGES[1]]
    r = client.chat.completions.create(model="my-lora", messages=parts, **GREEDY)
    assert r.choices[0].message.content == expect_lora


def test_chat_stream_logprobs_and_usage(chat_server):
    _, client, _, peft, tok = chat_server
    ids = templated(tok)
    with torch.no_grad():
        expect = greedy_ids(peft, ids, 8)
        ref = torch.log_softmax(peft(torch.tensor([ids + expect])).logits[0].float(), -1)
    chunks = list(client.chat.completions.create(model="my-lora", messages=MESSAGES, stream=True, logprobs=True,
                                                 top_logprobs=3, stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == decode(expect)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (len(ids), 8)
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == 8
    for i, (token, e) in enumerate(zip(expect, entries)):
        row = ref[len(ids) - 1 + i]
        assert abs(e.logprob - row[token].item()) < 1e-4
        assert len(e.top_logprobs) == 3 and abs(e.top_logprobs[0].logprob - row.max().item()) < 1e-4
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)

    r = client.chat.completions.create(model="my-lora", messages=MESSAGES, logprobs=True, **GREEDY)
    assert [abs(e.logprob - ref[len(ids) - 1 + i, t].item()) < 1e-4
            for i, (t, e) in enumerate(zip(expect, r.choices[0].logprobs.content))] == [True] * 8
    assert r.choices[0].logprobs.content[0].top_logprobs == []


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(chat_server):
    _, client, _, _, tok = chat_server
    r = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 128 - len(templated(tok)) and r.choices[0].finish_reason == "length"


def test_n_with_a_seed_gives_different_deterministic_choices(chat_server):
    _, client, _, _, _ = chat_server
    ask = dict(model="my-lora", messages=MESSAGES, max_tokens=12, temperature=1.0, seed=1234,
               extra_body={"ignore_eos": True})
    first = client.chat.completions.create(n=3, **ask)
    texts = [c.message.content for c in sorted(first.choices, key=lambda c: c.index)]
    assert len(set(texts)) == 3
    again = client.chat.completions.create(n=3, **ask)
    assert [c.message.content for c in sorted(again.choices, key=lambda c: c.index)] == texts
    singles = [client.chat.completions.create(n=1, **{**ask, "seed": 1234 + i}).choices[0].message.content
               for i in range(3)]
    assert singles == texts  # choice i is its own stream, seeded seed + i
    streamed = client.completions.create(model="my-lora", prompt="Hi", max_tokens=6, temperature=1.0, seed=9, n=2,
                                         stream=True, extra_body={"ignore_eos": True})
    by_index: dict[int, str] = {}
    for chunk in streamed:
        for c in chunk.choices:
            by_index[c.index] = by_index.get(c.index, "") + c.text
    plain = client.completions.create(model="my-lora", prompt="Hi", max_tokens=6, temperature=1.0, seed=9, n=2,
                                      extra_body={"ignore_eos": True})
    assert [by_index[0], by_index[1]] == [c.text for c in plain.choices] and by_index[0] != by_index[1]
    assert plain.usage.prompt_tokens == 2 and plain.usage.completion_tokens == 12


def test_best_of_returns_the_most_likely_candidates(chat_server):
    _, client, _, _, _ = chat_server
    ask = dict(model="tiny-llama", prompt=[[5, 6, 7], [8, 9]], max_tokens=6, temperature=1.0, logprobs=0,
               extra_body={"ignore_eos": True})
    best = client.completions.create(n=2, seed=42, extra_body={"ignore_eos": True, "best_of": 4},
                                     **{k: v for k, v in ask.items() if k != "extra_body"})
    assert len(best.choices) == 4 and best.usage.completion_tokens == 2 * 4 * 6
    for p, prompt in enumerate(ask["prompt"]):
        candidates = [client.completions.create(**{**ask, "prompt": prompt}, seed=42 + j).choices[0] for j in range(4)]
        score = lambda c: sum(c.logprobs.token_logprobs)  # noqa: E731
        ranked = sorted(candidates, key=score, reverse=True)
        assert [c.text for c in best.choices[2 * p : 2 * p + 2]] == [c.text for c in ranked[:2]]
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model="tiny-llama", prompt="x", n=3, extra_body={"best_of": 2})
    with pytest.raises(openai.BadRequestError, match="streamed"):
        client.completions.create(model="tiny-llama", prompt="x", stream=True, extra_body={"best_of": 2})


def test_penalties_over_http_equal_the_reference_loop(chat_server):
    """repetition_penalty, min_tokens and friends were once accepted and ignored; now they work."""
    _, client, hf, peft, _ = chat_server
    prompt = [72, 101, 108, 108, 111]
    params = SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=1.6, frequency_penalty=0.4,
                            presence_penalty=0.3, logit_bias=((33, 2.0),), min_tokens=10, stop_token_ids=(40,))
    body = {"repetition_penalty": 1.6, "frequency_penalty": 0.4, "presence_penalty": 0.3, "logit_bias": {"33": 2.0},
            "min_tokens": 10, "stop_token_ids": [40], "temperature": 0, "max_tokens": 10, "logprobs": 0}
    for model, oracle in (("tiny-llama", hf), ("my-lora", peft)):
        want = reference_generate(oracle, prompt, params, (EOS,))
        assert want != greedy_ids(oracle, prompt, 10)  # the parameters change the output
        r = httpx.post(f"{chat_server[0]}/v1/completions", json={"model": model, "prompt": prompt, **body}, timeout=60)
        assert r.status_code == 200, r.text
        tokens = r.json()["choices"][0]["logprobs"]["tokens"]
        assert "".join(tokens) == "".join(chat_server[4].decode([t]) for t in want)


def test_adapter_id_is_an_alias_of_model(chat_server):
    url, client, _, peft, tok = chat_server
    r = client.completions.create(model="tiny-llama", prompt=[1, 2, 3], max_tokens=6, temperature=0,
                                  extra_body={"adapter_id": "my-lora", "ignore_eos": True})
    assert r.choices[0].text == decode(greedy_ids(peft, [1, 2, 3], 6))
    r = httpx.post(f"{url}/v1/completions", json={"model": "my-lora", "adapter_id": "other", "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "adapter_id"


REFUSED = [("response_format", {"type": "json_object"}), ("guided_json", {"type": "object"}), ("guided_regex", "a+"),
           ("guided_choice", ["yes", "no"]), ("guided_grammar", "root ::= 'a'"), ("prompt_logprobs", 1),
           ("structured_outputs", {"json": {}}), ("min_p", 0.1), ("use_beam_search", True),
           ("include_stop_str_in_output", True), ("skip_special_tokens", False), ("allowed_token_ids", [1, 2]),
           ("bad_words", ["x"]), ("truncate_prompt_tokens", 4), ("logits_processors", ["x"]),
           ("return_tokens_as_token_ids", True), ("adapter_source", "hub"), ("tools", [{"type": "function"}])]


@pytest.mark.parametrize("field,value", REFUSED + [("suffix", "!"), ("add_special_tokens", False)])
def test_completions_refuse_fields_they_would_ignore(chat_server, field, value):
    r = httpx.post(f"{chat_server[0]}/v1/completions", json={"model": "tiny-llama", "prompt": "hi", field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


@pytest.mark.parametrize("field,value", REFUSED + [("echo", True), ("chat_template", "{{ messages }}"),
                                                   ("reasoning_effort", "high")])
def test_chat_refuses_fields_it_would_ignore(chat_server, field, value):
    r = httpx.post(f"{chat_server[0]}/v1/chat/completions", json={"model": "tiny-llama", "messages": MESSAGES, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


def test_harmless_and_no_op_fields_are_accepted(chat_server):
    url = chat_server[0]
    extras = {"user": "u1", "store": False, "metadata": {"a": "b"}, "service_tier": "auto", "some_new_field": 1,
              "response_format": {"type": "text"}, "tool_choice": "none", "skip_special_tokens": True,
              "prompt_logprobs": None}
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                   json={"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 2, **extras})
    assert r.status_code == 200, r.text
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 2,
                                                               "suffix": None, **extras})
    assert r.status_code == 200, r.text


def test_chat_input_errors(chat_server):
    url = chat_server[0]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    for body, param in [({"messages": image}, "messages.0.content"), ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
                        ({"messages": MESSAGES, "chat_template_kwargs": {"tokenize": True}}, None),
                        ({"messages": MESSAGES, "continue_final_message": True}, None)]:
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny-llama", **body})
        assert r.status_code == 400, (body, r.text)
        assert param is None or r.json()["error"]["param"] == param
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny-llama", "messages": []})
    assert r.status_code == 422


# ---------------------------------------------------------------------- models, tokenizer, version
def test_models_retrieve(chat_server):
    url, client, _, _, _ = chat_server
    base, lora = client.models.retrieve("tiny-llama"), client.models.retrieve("my-lora")
    assert (base.id, base.owned_by) == ("tiny-llama", "adapter-server") and getattr(base, "parent", None) is None
    assert (lora.id, lora.parent, lora.max_model_len) == ("my-lora", "tiny-llama", 128)
    with pytest.raises(openai.NotFoundError, match="ghost"):
        client.models.retrieve("ghost")
    assert [m.id for m in client.models.list().data] == ["tiny-llama", "my-lora"]
    assert httpx.get(f"{url}/version").json()["version"]


def test_tokenize_and_detokenize_in_vllm_shapes(chat_server):
    url, _, _, _, tok = chat_server
    r = httpx.post(f"{url}/tokenize", json={"prompt": "Hello", "return_token_strs": True}).json()
    assert r == {"count": 5, "max_model_len": 128, "tokens": tok("Hello")["input_ids"],
                 "token_strs": tok.convert_ids_to_tokens(tok("Hello")["input_ids"])}
    r = httpx.post(f"{url}/tokenize", json={"model": "my-lora", "messages": MESSAGES}).json()
    assert r["tokens"] == templated(tok) and r["count"] == len(templated(tok)) and "token_strs" not in r
    r = httpx.post(f"{url}/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert r["tokens"] == list(tok.apply_chat_template(MESSAGES, tokenize=True))
    assert httpx.post(f"{url}/tokenize", json={"prompt": "<|endoftext|>", "add_special_tokens": False}).json()["tokens"] == [256]
    assert httpx.post(f"{url}/detokenize", json={"tokens": [72, 105]}).json() == {"prompt": "Hi"}
    for path, body, status in [("/detokenize", {"tokens": [1, 10**6]}, 400), ("/tokenize", {"prompt": "x", "model": "ghost"}, 404),
                               ("/tokenize", {}, 400), ("/tokenize", {"prompt": "x", "messages": MESSAGES}, 400),
                               ("/tokenize", {"prompt": "x", "chat_template": "{{ 1 }}"}, 400)]:
        assert httpx.post(f"{url}{path}", json=body).status_code == status, (path, body)
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["chat_template"] == tok.chat_template
    assert info["model_max_length"] == 128


def test_chat_template_flag_and_a_model_without_template(tmp_path):
    """In process: no template -> 400 naming --chat-template; with the flag the file's template."""
    from fastapi.testclient import TestClient

    from adapter_runtime.engine import Engine, EngineConfig
    from adapter_runtime.models import load_model
    from adapter_runtime.tokenizer import build_byte_tokenizer
    from server.app import create_app
    from server.settings import Settings

    ckpt = tmp_path / "plain"
    base_hf().save_pretrained(ckpt)
    plain = build_byte_tokenizer()
    plain.chat_template = None
    plain.save_pretrained(ckpt)
    body = {"model": "plain", "messages": MESSAGES, "max_tokens": 3, "temperature": 0}

    def post(settings: Settings, path: str, json: dict) -> httpx.Response:
        engine = Engine(load_model(ckpt), config=EngineConfig(max_batch=2, max_seq_len=96))
        with TestClient(create_app(settings, engine=engine)) as client:
            return client.post(path, json=json)

    r = post(Settings(), "/v1/chat/completions", body)
    assert r.status_code == 400 and "--chat-template" in r.json()["error"]["message"]
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}>>")
    rendered = plain("[system] Be brief.\n[user] Hello there\n>>")["input_ids"]
    assert post(Settings(chat_template=str(template)), "/tokenize", {"messages": MESSAGES}).json()["tokens"] == rendered
    r = post(Settings(chat_template=str(template)), "/v1/chat/completions", body)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(rendered)
