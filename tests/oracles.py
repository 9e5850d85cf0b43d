"""Adapters made by the oracle libraries, randomized, saved as their users would save them.

`peft_adapter` / `adapterhub_adapter` return the saved directory and the library model that
made it, so a test can compare against the library's own outputs. Every adapter parameter is
randomized: default inits (LoRA B = 0, IA3 = 1, parallel adapters) equal the base model and
would make any comparison pass.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tests.tiny import hf_model


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
