"""Adapters made by the oracle libraries, randomized, saved as their users would save them.

`peft_adapter` / `adapterhub_adapter` return the saved directory and the library model that
made it, so a test can compare against the library's own outputs. Every adapter parameter is
randomized: default inits (LoRA B = 0, IA3 = 1, parallel adapters) equal the base model and
would make any comparison pass.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from adapter_runtime.sampling import SamplingParams

from tests.support.tiny import hf_model


def peft_adapter(kind: str, config, directory: Path, seed: int = 1, ia3: bool = False, **model_overrides):
    """get_peft_model on a fresh tiny base (same seed as the base checkpoint), randomize, save."""
    from peft import get_peft_model

    model = get_peft_model(hf_model(kind, **model_overrides), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1 + 0.3 * noise if ia3 else 0.3 * noise)
    model.eval().save_pretrained(directory)
    return Path(directory), model


def adapterhub_adapter(kind: str, config, directory: Path, name: str = "ad", seed: int = 1, scale: float = 0.3,
                       hf=None, **model_overrides):
    """adapters.init on a tiny base (or `hf`), add + randomize + activate the adapter, save."""
    import adapters

    if hf is None:
        hf = hf_model(kind, **model_overrides)
        adapters.init(hf)
    hf.add_adapter(name, config=config)
    g = torch.Generator().manual_seed(seed)
    pattern = re.compile(rf"\.{re.escape(name)}\.")
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if pattern.search(pname + "."):
                p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if "lora_B" in pname and p.shape[-1] == 1 else 0.0))
    hf.set_active_adapters(name)
    hf.eval()
    hf.save_adapter(str(directory), name)
    return Path(directory), hf


def greedy_library(model, prompt: list[int], steps: int) -> list[int]:
    """A plain argmax loop over full forwards (use_cache=False: the `adapters` library's Llama
    cache is broken with transformers 4.57, reference §5.11)."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([tokens]), use_cache=False).logits[0, -1]
            tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]


def greedy_ids(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy `generate` (with its KV cache)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=n)
    return out[0, len(prompt):].tolist()


def reference_logits(logits: list[float], prompt: list[int], output: list[int], p: SamplingParams,
                     eos: tuple[int, ...]) -> list[float]:
    """vLLM's order, written as a plain loop over the vocabulary: min_tokens (no end token
    yet), logit_bias, repetition penalty (prompt or output tokens), frequency and presence."""
    out = list(logits)
    if len(output) < p.min_tokens:
        for t in (() if p.ignore_eos else eos) + p.stop_token_ids:
            out[t] = -math.inf
    for t, bias in p.logit_bias:
        out[t] += bias
    for v in range(len(out)):
        count = output.count(v)
        if p.repetition_penalty != 1.0 and (v in prompt or count > 0):
            out[v] = out[v] / p.repetition_penalty if out[v] > 0 else out[v] * p.repetition_penalty
        out[v] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return out


def reference_generate(model, prompt: list[int], p: SamplingParams, eos: tuple[int, ...]) -> list[int]:
    """Greedy over full forwards, each step's logits changed by `reference_logits`."""
    output: list[int] = []
    with torch.no_grad():
        while len(output) < p.max_tokens:
            logits = model(torch.tensor([prompt + output])).logits[0, -1].float().tolist()
            logits = reference_logits(logits, prompt, output, p, eos)
            token = max(range(len(logits)), key=logits.__getitem__)
            output.append(token)
            if token in p.stop_token_ids or (not p.ignore_eos and token in eos):
                break
    return output
