"""The same engine on an accelerator: runs when CUDA is available (or when
ADAPTER_SERVER_TEST_DEVICE names a device, e.g. `cpu` to exercise this file anywhere).

Checks: our model on the device against transformers on the CPU; a mixed batch of adapters
of both libraries on the device gives the CPU engine's greedy tokens; merge then reset on the
device restores every base weight bit for bit; bf16 serves finite log-probabilities."""

from __future__ import annotations

import os

import pytest
import torch

from adapter_runtime import merge as merge_ops
from adapter_runtime.engine import Engine, EngineConfig, Request
from adapter_runtime.formats import load_adapter
from tests.support.packed import forward_sequences
from adapter_runtime.models import load_model
from adapter_runtime.sampling import SamplingParams
from tests.support.oracles import adapterhub_adapter, peft_adapter
from tests.support.tiny import hf_model, random_ids, save_checkpoint

DEVICE = os.environ.get("ADAPTER_SERVER_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no accelerator (set ADAPTER_SERVER_TEST_DEVICE to force a device)")
TOL = 1e-3  # fp32 on a GPU may sum in another order than the CPU reference


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    pytest.importorskip("adapters")
    pytest.importorskip("peft")
    from adapters import SeqBnInvConfig
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    root = tmp_path_factory.mktemp("device")
    hf = hf_model("llama")
    ckpt = save_checkpoint(hf, root / "base")
    made = {
        "lora": peft_adapter("llama", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), root / "lora", seed=1)[0],
        "ia3": peft_adapter("llama", IA3Config(), root / "ia3", seed=2, ia3=True)[0],
        "prefix": peft_adapter("llama", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), root / "prefix", seed=3)[0],
        "prompt": peft_adapter("llama", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), root / "prompt", seed=4)[0],
        "madx": adapterhub_adapter("llama", SeqBnInvConfig(), root / "madx", seed=5)[0],
    }
    return hf, ckpt, made


def greedy(lm, made, prompts, names):
    engine = Engine(lm, config=EngineConfig(max_batch=8, max_seq_len=64))
    for name, directory in made.items():
        engine.registry.register(name, load_adapter(directory, lm.info, name))
    with engine:
        handles = [engine.submit(Request(tuple(p), SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                                         () if n is None else engine.registry.resolve(n)))
                   for p, n in zip(prompts, names)]
        return [h.result(120).token_ids for h in handles]


def test_model_on_device_matches_transformers_on_cpu(world):
    hf, ckpt, _ = world
    ours = load_model(ckpt, "float32", DEVICE)
    ids = random_ids(2, 10)
    with torch.no_grad():
        ref = hf(ids).logits
    out = forward_sequences(ours.model, ids.tolist(), device=DEVICE)
    assert max((o.cpu() - r).abs().max().item() for o, r in zip(out, ref)) <= TOL


def test_mixed_adapters_on_device_give_the_cpu_tokens(world):
    _, ckpt, made = world
    names = [*made, None]
    prompts = random_ids(len(names), 6, seed=3).tolist()
    on_device = greedy(load_model(ckpt, "float32", DEVICE), made, prompts, names)
    on_cpu = greedy(load_model(ckpt, "float32", "cpu"), made, prompts, names)
    assert on_device == on_cpu


def test_merge_and_reset_on_device_are_exact(world):
    _, ckpt, made = world
    lm = load_model(ckpt, "float32", DEVICE)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    record = merge_ops.merge(lm.model, load_adapter(made["lora"], lm.info, "lora").to(DEVICE))
    merge_ops.reset(lm.model, record)
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


def test_bfloat16_serves_finite_logprobs(world):
    _, ckpt, made = world
    lm = load_model(ckpt, "bfloat16", DEVICE)
    engine = Engine(lm, config=EngineConfig(max_batch=4, max_seq_len=64))
    engine.registry.register("lora", load_adapter(made["lora"], lm.info, "lora"))
    with engine:
        out = engine.submit(Request((1, 2, 3, 4), SamplingParams(max_tokens=4, temperature=0.0, logprobs=1),
                                    engine.registry.resolve("lora"))).result(120)
    assert len(out.token_ids) == 4 and all(torch.isfinite(torch.tensor(lp.logprob)) for lp in out.logprobs)
