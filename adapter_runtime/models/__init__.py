"""Model families and checkpoint loading. `load_model` is the one entry point."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import ModelLoadError
from ..tokenizer import build_byte_tokenizer, load_tokenizer
from .common import KVCache, ModelInfo
from .gpt2 import GPT2LMHeadModel
from .llama import LLAMA_TYPES, LlamaForCausalLM

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

DEFAULT_MODEL_NAME = "tiny-llama-embedded"


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module  # GPT2LMHeadModel | LlamaForCausalLM, eval mode, frozen
    tokenizer: object  # a transformers tokenizer
    info: ModelInfo
    name: str  # what /v1/models calls the base model
    eos_token_ids: tuple[int, ...]


def model_class(config) -> type[nn.Module]:
    if config.model_type == "gpt2":
        return GPT2LMHeadModel
    if config.model_type in LLAMA_TYPES:
        return LlamaForCausalLM
    raise ModelLoadError(f"unsupported model_type {config.model_type!r}; supported: gpt2, {', '.join(LLAMA_TYPES)}")


def read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF checkpoint: model.safetensors, a sharded safetensors index, or a
    pytorch_model.bin read with weights_only=True (never an unrestricted unpickle)."""
    if (model_dir / "model.safetensors").exists():
        return load_file(model_dir / "model.safetensors")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (model_dir / index_name).exists():
            shards = sorted(set(json.loads((model_dir / index_name).read_text())["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load_file(model_dir / shard) if shard.endswith(".safetensors")
                             else torch.load(model_dir / shard, map_location="cpu", weights_only=True))
            return state
    if (model_dir / "pytorch_model.bin").exists():
        return torch.load(model_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ModelLoadError(f"no model.safetensors, sharded index or pytorch_model.bin in {model_dir}")


def build_model(config, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device) -> nn.Module:
    cls = model_class(config)
    state = cls.convert_checkpoint(state)
    with torch.device("meta"):
        model = cls(config)
    tied = model.args.tie_word_embeddings
    if tied:
        state.pop("lm_head.weight", None)
    model = model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(f"checkpoint does not match {cls.__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.lm_head.weight = input_embeddings(model).weight
    model = model.to(device=device, dtype=dtype).eval()
    model.after_load()  # what each family computes rather than loads (Llama: its rotary tables, fp32)
    model.requires_grad_(False)
    return model


def input_embeddings(model: nn.Module) -> nn.Embedding:
    return model.transformer.wte if isinstance(model, GPT2LMHeadModel) else model.model.embed_tokens


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks in order (each family names them its own way)."""
    return model.transformer.h if isinstance(model, GPT2LMHeadModel) else model.model.layers


def load_model(model_dir: str | Path | None, dtype: str | torch.dtype = "float32", device: str = "cpu") -> LoadedModel:
    """A local HF checkpoint directory (config.json + weights + tokenizer), or with None the
    embedded default model. Never downloads anything."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    device = torch.device(device)
    if model_dir is None:
        return default_model(dtype, device)
    from transformers import AutoConfig  # transformers loads slowly: only where a checkpoint is read

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise ModelLoadError(f"{model_dir} has no config.json (a local Hugging Face checkpoint directory is expected)")
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    model = build_model(config, read_checkpoint(model_dir), dtype, device)
    tokenizer = load_tokenizer(model_dir)
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    return LoadedModel(model, tokenizer, model.info, model_dir.name, eos_ids)


DEFAULT_WEIGHTS = Path(__file__).with_name("tiny_llama_embedded.safetensors")  # made by demo/train_base.py


def default_model_config():
    """The embedded default: a small Llama (GQA) over the byte-level tokenizer, trained by
    `demo/train_base.py` on Python's own documentation. Ids 0-255 are bytes, 256 is
    end-of-text; 257-263 are reserved for special tokens (untrained). Trained on windows of up
    to 512 bytes; positions up to 2048 are accepted (RoPE), with text degrading past 512."""
    from transformers import LlamaConfig  # as in load_model

    return LlamaConfig(
        vocab_size=264, hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=256, eos_token_id=256, pad_token_id=256,
    )


def default_model(dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """The embedded model from its committed weights (fp16 on disk, cast to `dtype`)."""
    if not DEFAULT_WEIGHTS.exists():
        raise ModelLoadError(f"the embedded model's weights are missing ({DEFAULT_WEIGHTS}); "
                             "reinstall the package or run `python -m demo.train_base`")
    model = build_model(default_model_config(), load_file(DEFAULT_WEIGHTS), dtype, device)
    return LoadedModel(model, build_byte_tokenizer(), model.info, DEFAULT_MODEL_NAME, (256,))


__all__ = ["KVCache", "LoadedModel", "ModelInfo", "load_model", "model_class", "build_model", "decoder_layers",
           "input_embeddings", "DEFAULT_MODEL_NAME", "DEFAULT_WEIGHTS", "default_model_config"]
