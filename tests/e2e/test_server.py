"""A real `python -m server serve` process, driven by the official OpenAI client; generations
and log-probabilities are checked against transformers. (What the HTTP layer decides alone,
error shapes, keys and limits, is tested in-process in tests/server/.)"""

from __future__ import annotations

import pytest
import torch

from tests.support.oracles import greedy_ids


@pytest.fixture
def served(chat_server):
    """(HF base, SDK client, url) of the session's tiny-Llama server (tests/e2e/conftest.py)."""
    url, client, hf, _, _ = chat_server
    return hf, client, url


def test_models_lists_the_base_model_and_its_adapter(served):
    _, client, _ = served
    assert [m.id for m in client.models.list().data] == ["tiny-llama", "my-lora"]


def test_completion_and_stream_equal_transformers_greedy(served):
    hf, client, _ = served
    from adapter_runtime.tokenizer import build_byte_tokenizer

    tok = build_byte_tokenizer()
    prompts = [[72, 101, 108, 108, 111], [10, 20, 30]]
    expect = [tok.decode(greedy_ids(hf, p, 8), skip_special_tokens=True) for p in prompts]
    r = client.completions.create(model="tiny-llama", prompt=prompts, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == expect
    assert all(c.finish_reason == "length" for c in r.choices)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (8, 16, 24)

    chunks = list(client.completions.create(model="tiny-llama", prompt=prompts[0], max_tokens=8, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == expect[0]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_echo_logprobs_score_the_prompt_like_transformers(served):
    hf, client, _ = served
    prompt = [5, 17, 99, 230, 42, 7, 64, 128]
    r = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0], -1)
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(prompt)
    got = torch.tensor(lp.token_logprobs[1:])
    want = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    assert torch.allclose(got, want, atol=1e-4)
    assert r.usage.completion_tokens == 0 and r.choices[0].finish_reason == "length"
