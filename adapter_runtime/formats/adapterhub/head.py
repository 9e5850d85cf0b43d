"""Flex causal-LM heads saved beside adapters of AdapterHub `*AdapterModel` classes
(reference §1.1, §3.3)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from torch import Tensor

from ...adapters import LMHead
from ...errors import AdapterFormatError, AdapterIncompatible, AdapterUnsupported
from ...models.common import ModelInfo
from .. import expect_shape, read_json, read_tensors
from .parts import activation_name

HEAD_WEIGHT_FILES = ("model_head.safetensors", "pytorch_model_head.bin")


def is_flex_model(meta: Mapping) -> bool:
    """Saved from a flex-head `*AdapterModel` (its head, if saved, replaces the LM head) rather
    than an HF `*ForCausalLM` class (whose head file is just the tied embedding: ignored)."""
    return str(meta.get("model_class") or "").endswith("AdapterModel")


def read_flex_head(directory: Path, meta: Mapping, info: ModelInfo) -> LMHead | None:
    """The causal-LM head saved beside a flex-model adapter, as `CausalLMHead.build` stacks it:
    (layers - 1) x [Linear, activation?, LayerNorm?], then the vocabulary projection, whose
    weight is tied to the base embeddings (checked by shape, not stored) and whose bias is kept."""
    if not is_flex_model(meta) or not (directory / "head_config.json").is_file():
        return None
    head_meta = read_json(directory / "head_config.json")
    config = head_meta.get("config") or {}
    if config.get("head_type") != "causal_lm":
        raise AdapterUnsupported(f"prediction head type {config.get('head_type')!r} is not supported: "
                                 "only causal_lm heads produce next-token logits")
    H, V = info.hidden_size, info.vocab_size
    E = config.get("embedding_size") or H
    if E != H or config.get("vocab_size", V) != V:
        raise AdapterIncompatible(f"head sizes (embedding {E}, vocab {config.get('vocab_size')}) do not match the "
                                  f"base model (hidden {H}, vocab {V})")
    tensors = read_tensors(directory, HEAD_WEIGHT_FILES)
    head_name = head_meta.get("name") or meta.get("name")
    prefix = f"heads.{head_name}."
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...]) -> Tensor:
        if prefix + key not in tensors:
            raise AdapterFormatError(f"head weights lack {prefix + key}")
        used.add(prefix + key)
        return expect_shape(prefix + key, tensors[prefix + key], shape)

    layers, index = [], 0
    for _ in range(int(config.get("layers", 1)) - 1):
        layers.append(("linear", take(f"{index}.weight", (E, E)), take(f"{index}.bias", (E,))))
        index += 1
        if config.get("activation_function"):
            layers.append(("act", activation_name(config["activation_function"])))
            index += 1
        if config.get("layer_norm"):
            # the library's eps is config.layer_norm_eps, which GPT-2 and Llama configs lack: 1e-12
            layers.append(("ln", take(f"{index}.weight", (E,)), take(f"{index}.bias", (E,)), 1e-12))
            index += 1
    take(f"{index}.weight", (V, E))  # the projection: tied to the base embeddings
    bias = take(f"{index}.bias", (V,)) if config.get("bias") else None
    if unused := sorted(set(tensors) - used):
        raise AdapterFormatError(f"head weights hold tensors the head config does not explain: {unused[:5]}")
    return LMHead(layers=tuple(layers), bias=bias)


