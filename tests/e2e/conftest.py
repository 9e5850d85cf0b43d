"""Live servers shared by more than one end-to-end module."""

from __future__ import annotations

import openai
import pytest

from tests.support.every_type import make_every_type
from tests.support.live import start_server, stop_server
from tests.support.oracles import greedy_ids
from tests.support.served import PROMPT, base_hf, make_peft_lora, peft_greedy, serve_keyed
from tests.support.tiny import decode, save_checkpoint


@pytest.fixture(scope="session")
def chat_server(tmp_path_factory):
    """(base url, SDK client, HF base, PEFT model, tokenizer): the tiny Llama with a PEFT LoRA
    registered at start, one process for the session (the server, OpenAI-surface and ecosystem
    tests; none of them changes what it serves)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("openai")
    ckpt = save_checkpoint(base_hf(), tmp / "tiny-llama")
    lora = make_peft_lora(tmp / "my-lora", seed=3)
    proc, url = start_server("--model", str(ckpt), "--adapter", f"my-lora={lora}", "--max-seq-len", "128",
                             "--max-batch", "8")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    peft = PeftModel.from_pretrained(base_hf(), lora).eval()
    yield url, client, base_hf(), peft, AutoTokenizer.from_pretrained(ckpt)
    stop_server(proc)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """(root, {name: reference token ids}) for every adapter type, plus the LoRA sets
    (tests.support.every_type)."""
    return make_every_type(tmp_path_factory.mktemp("adapter-root"))


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory):
    """(url, work dir holding ./my-lora, expected base text, expected LoRA text): the tiny Llama
    with both keys and an empty store, one process for the session (the client and CLI tests;
    each removes the adapters it adds and resets what it merges)."""
    tmp = tmp_path_factory.mktemp("keyed")
    proc, url = serve_keyed(tmp)
    lora = make_peft_lora(tmp / "my-lora")
    expect_base = decode(greedy_ids(base_hf(), PROMPT, 8))
    expect_lora = decode(peft_greedy(lora, PROMPT, 8))
    assert expect_base != expect_lora  # otherwise the adapter tests prove nothing
    yield url, tmp, expect_base, expect_lora
    stop_server(proc)
