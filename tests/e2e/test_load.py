"""A bounded load test on loopback: 64 concurrent clients over 32 adapters of every type (and
the base model), a fixed number of greedy requests. Every answer must equal the same request's
answer when it ran alone; the only errors allowed are the deliberate 429s of the per-client
concurrency limit (the client then retries)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support.live import ServerProcess

peft = pytest.importorskip("peft")
adapters = pytest.importorskip("adapters")
from adapters import CompacterConfig, IA3Config as AhIA3, LoRAConfig as AhLoRA  # noqa: E402
from adapters import PrefixTuningConfig as AhPrefix, SeqBnConfig, SeqBnInvConfig  # noqa: E402
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig  # noqa: E402

from tests.support.oracles import adapterhub_adapter, peft_adapter  # noqa: E402
from tests.support.tiny import hf_model, save_checkpoint  # noqa: E402

HIDDEN = 128  # Compacter's PHM needs a hidden size its factors divide
CLIENTS, ADAPTERS, REQUESTS, STEPS = 64, 32, 160, 8
PROMPTS = [[5, 17, 99, 230, 42], [10, 20, 30], [7, 7, 8, 9, 250, 3, 1]]


def make_adapters(root: Path) -> list[Path]:
    """One saved directory per adapter type (randomized by the oracle helpers)."""
    kw = {"hidden": HIDDEN}
    peft_configs = {
        "peft-lora": (LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), False),
        "peft-ia3": (IA3Config(task_type="CAUSAL_LM"), True),
        "peft-prefix": (PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), False),
        "peft-prompt": (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), False),
    }
    dirs = [peft_adapter("llama", c, root / n, seed=i + 1, ia3=ia3, **kw)[0] for i, (n, (c, ia3)) in enumerate(peft_configs.items())]
    hub_configs = {"ah-seqbn": SeqBnConfig(), "ah-compacter": CompacterConfig(), "ah-inv": SeqBnInvConfig(),
                   "ah-prefix": AhPrefix(prefix_length=6, bottleneck_size=32), "ah-lora": AhLoRA(r=4, alpha=8),
                   "ah-ia3": AhIA3()}
    dirs += [adapterhub_adapter("llama", c, root / n, name=n.replace("-", "_"), seed=10 + i, **kw)[0]
             for i, (n, c) in enumerate(hub_configs.items())]
    return dirs


def body(model: str, prompt: list[int], stream: bool) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": STEPS, "temperature": 0, "ignore_eos": True, "stream": stream}


def complete(client: httpx.Client, model: str, prompt: list[int], stream: bool) -> tuple[int, str]:
    """(status, text); a stream's text is its chunks joined (an error chunk fails the test)."""
    if not stream:
        r = client.post("/v1/completions", json=body(model, prompt, False))
        return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text
    with client.stream("POST", "/v1/completions", json=body(model, prompt, True)) as r:
        if r.status_code != 200:
            return r.status_code, r.read().decode()
        text = ""
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["text"]
        return 200, text


def test_64_clients_32_adapters_every_answer_equals_its_single_request(tmp_path):
    ckpt = save_checkpoint(hf_model("llama", hidden=HIDDEN), tmp_path / "tiny-llama")
    dirs = make_adapters(tmp_path / "adapters")
    live = ServerProcess("--model", str(ckpt), "--max-seq-len", "64", "--max-batch", "16", "--store-dir",
                         str(tmp_path / "store"), "--device-cache-adapters", "12", "--max-streams-per-key", "40",
                         "--log-level", "warning", log_path=tmp_path / "server.log", timeout=90.0, log_level=None)
    names = [f"{dirs[i % len(dirs)].name}-{i}" for i in range(ADAPTERS)]  # each type under several names
    try:
        with httpx.Client(base_url=live.url, timeout=120) as admin:
            for name, directory in zip(names, [dirs[i % len(dirs)] for i in range(ADAPTERS)]):
                files = [("files", (f.name, f.read_bytes())) for f in sorted(directory.iterdir()) if f.is_file()]
                r = admin.post("/v1/adapters", data={"name": name}, files=files)
                assert r.status_code == 201, r.text
            models = ["tiny-llama", *names]
            refs = {}
            for model in models:  # one request at a time: the reference
                for k, prompt in enumerate(PROMPTS):
                    status, text = complete(admin, model, prompt, False)
                    assert status == 200, text
                    refs[model, k] = text
            base = [refs["tiny-llama", k] for k in range(len(PROMPTS))]
            assert all([refs[m, k] for k in range(len(PROMPTS))] != base for m in names)  # every adapter acts

        jobs = [(models[i % len(models)], i % len(PROMPTS), i % 3 == 0) for i in range(REQUESTS)]
        throttled = []

        def run(job) -> tuple:
            model, k, stream = job
            with httpx.Client(base_url=live.url, timeout=120) as client:
                for _ in range(200):
                    status, text = complete(client, model, PROMPTS[k], stream)
                    if status != 429:
                        return job, status, text
                    throttled.append(job)
                    time.sleep(0.05)
            return job, 429, "still throttled"

        start = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(run, jobs))
        elapsed = time.monotonic() - start
        errors = [(job, status, text) for job, status, text in results if status != 200]
        assert not errors, errors[:5]
        wrong = [(job, text, refs[job[0], job[1]]) for job, _, text in results if text != refs[job[0], job[1]]]
        assert not wrong, wrong[:5]
        assert live.proc.poll() is None and httpx.get(live.url + "/health").json()["running"] == 0
        print(f"{REQUESTS} requests, {len(throttled)} deliberate 429s, {elapsed:.1f} s")
    finally:
        assert live.stop() == 0
