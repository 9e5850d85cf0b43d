"""The tiny Llama the client, CLI and OpenAI-surface tests serve, with its keys and a PEFT LoRA
made by PEFT itself (the expected outputs come from transformers and PEFT, never the server)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.support.live import start_server
from tests.support.oracles import greedy_ids
from tests.support.tiny import hf_model, save_checkpoint

USER_KEY, ADMIN_KEY = "user-secret", "admin-secret"  # as in the README quick start
MAX_UPLOAD = 4 << 20  # the keyed server's max_upload_bytes
PROMPT = [72, 101, 108, 108, 111]  # "Hello"


def base_hf():
    """The served base model, as transformers (eos off so that greedy runs run to length)."""
    hf = hf_model("llama")
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def make_peft_lora(directory: Path, seed: int = 1) -> Path:
    """A PEFT LoRA on the tiny Llama, weights randomized, saved with `save_pretrained`."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(hf_model("llama"), LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval().save_pretrained(directory)
    return Path(directory)


def peft_greedy(directory: Path, prompt: list[int], n: int) -> list[int]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_hf(), directory).eval()
    return greedy_ids(model, prompt, n)


def serve_keyed(tmp: Path) -> tuple:
    """(process, url): the tiny Llama with both keys, a store and an adapter root under `tmp`."""
    ckpt = save_checkpoint(base_hf(), tmp / "tiny-llama")
    return start_server("--model", str(ckpt), "--max-seq-len", "64", "--max-batch", "4", "--store-dir", str(tmp / "store"),
                        "--api-key", USER_KEY, "--admin-key", ADMIN_KEY, "--adapter-root", str(tmp),
                        "--max-upload-bytes", str(MAX_UPLOAD))
