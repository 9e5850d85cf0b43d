"""A real `python -m server serve` process, driven by the official OpenAI client and httpx;
generations and log-probabilities are checked against transformers."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest
import torch

from tests.support.live import ROOT, start_server, stop_server
from tests.support.oracles import greedy_ids
from tests.support.tiny import hf_model, save_checkpoint


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    hf = hf_model("llama")
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ckpt = save_checkpoint(hf, tmp_path_factory.mktemp("ckpt") / "tiny-llama")
    proc, url = start_server("--model", str(ckpt), "--max-seq-len", "64", "--max-batch", "4")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield hf, client, url
    stop_server(proc)


def test_models_lists_the_base_model(served):
    _, client, _ = served
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]


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


def test_errors_have_the_openai_shape(served):
    _, client, url = served
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
    assert "no-such-adapter" in str(e.value) and "tiny-llama" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-llama", prompt="hi", max_tokens=100)
    assert "maximum context length 64" in str(e.value)

    with pytest.raises(openai.NotFoundError, match="'ghost' not found"):
        client.completions.create(model="tiny-llama", prompt="hi", max_tokens=2, extra_body={"adapters": ["ghost"]})

    r = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "hi"})
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny-llama", "prompt": "hi", "logprobs": 9})
    assert r.status_code == 422 and r.json()["error"]["param"] == "logprobs"


def test_embedded_default_model_answers():
    proc, url = start_server()
    try:
        r = httpx.post(f"{url}/v1/completions", timeout=60,
                       json={"model": "tiny-llama-embedded", "prompt": "Hello", "max_tokens": 5, "temperature": 0})
        body = r.json()
        assert r.status_code == 200, body
        assert body["choices"][0]["finish_reason"] in ("stop", "length") and body["usage"]["prompt_tokens"] == 5
    finally:
        stop_server(proc)


def test_settings_from_env_and_flags():
    from server.settings import Settings

    env = {"ADAPTER_SERVER_PORT": "9001", "ADAPTER_SERVER_MAX_BATCH": "8", "ADAPTER_SERVER_ADAPTERS": "a=/x, b=/y"}
    s = Settings.from_env(env, port=9002, model=None)
    assert (s.port, s.max_batch, s.adapters, s.model) == (9002, 8, (("a", "/x"), ("b", "/y")), None)


def test_readme_api_examples(tmp_path):
    """The README's curl and Python examples, as written, against `serve` with no --model
    (the embedded default model, which is what `make serve` runs)."""
    import re

    text = (ROOT / "README.md").read_text()
    section = text[text.index("<!-- api:start -->") : text.index("<!-- api:end -->")]
    blocks = [(m[1], m[2]) for m in re.finditer(r"^```(\w+)\n(.*?)^```", section, re.S | re.M)]
    assert [lang for lang, _ in blocks] == ["bash", "python"]
    proc, url = start_server("--store-dir", str(tmp_path / "store"))
    try:
        for lang, code in blocks:
            code = code.replace("http://127.0.0.1:8000", url)
            cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
            assert r.returncode == 0, f"{lang} example failed:\n{r.stdout}\n{r.stderr}"
            if lang == "bash":
                assert '"object":"text_completion"' in r.stdout.replace(" ", "")
            else:
                assert r.stdout.strip()
    finally:
        stop_server(proc)
