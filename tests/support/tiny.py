"""Tiny random HF checkpoints for tests: built in-process, saved to a temp dir, never downloaded.

The shapes follow shared/reference (GPT-2: 2 layers, n_embd 64, 4 heads, vocab 300;
Llama: hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads, vocab 300). Base biases
and norms are perturbed so that identity initialisations cannot hide a bug.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 300
EOS = VOCAB - 1  # the tiny checkpoints' bos/eos (config.eos_token_id)


def hf_config(kind: str, hidden: int = 64, **overrides):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    if kind == "gpt2":
        cfg = GPT2Config(n_layer=2, n_embd=hidden, n_head=4, vocab_size=VOCAB, n_positions=128,
                         bos_token_id=EOS, eos_token_id=EOS)
    else:
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind]
        cfg = cls(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=EOS, eos_token_id=EOS, tie_word_embeddings=False)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg._attn_implementation = "eager"
    return cfg


def hf_model(kind: str, seed: int = 0, hidden: int = 64, **overrides):
    """A random transformers model in eval mode (eager attention), norms/biases perturbed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind, hidden, **overrides), attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_checkpoint(model, directory: Path) -> Path:
    """Save weights + config + a small byte-level tokenizer, like a real local checkpoint."""
    from adapter_runtime.tokenizer import build_byte_tokenizer

    directory = Path(directory)
    model.save_pretrained(directory)
    build_byte_tokenizer().save_pretrained(directory)
    return directory


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB - 1, (batch, length), generator=g)


def decode(ids: list[int]) -> str:
    """Token ids as text, through the byte tokenizer every tiny checkpoint is saved with."""
    from adapter_runtime.tokenizer import build_byte_tokenizer

    return build_byte_tokenizer().decode(ids, skip_special_tokens=True)
