"""Reader for Hugging Face PEFT `save_pretrained` directories (PEFT 0.21.2 semantics).

A directory holds `adapter_config.json` and `adapter_model.safetensors` (or the legacy
`adapter_model.bin`, read with weights_only=True). See shared/reference/peft-format.md.

The set of adapted modules comes from the tensor KEYS, never from re-running PEFT's target
matching: `target_modules` may be a regex, "all-linear" is expanded before saving, and keys
are what PEFT itself loads. The config only supplies scales and flags that change the math.

Supported: LoRA (rank/alpha patterns, rsLoRA, lora_bias; fan_in_fan_out only matters for
merging), (IA)^3 (output and feed-forward input scaling), prompt tuning, P-tuning, prefix
tuning (with or without projection: the file holds the final KV). Everything that replaces or
mutates base weights, changes the model structure, or uses different math is refused with
a typed error naming the option.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from torch import Tensor

from ..adapters import Adapter, LoRA, Prefix, Prompt, Scale
from ..errors import AdapterFormatError, AdapterIncompatible, AdapterUnsupported
from ..models.common import ModelInfo
from . import expect_shape, read_json, read_tensors

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

# peft_type -> our method name. P-tuning saves its encoder's output, so at inference it is
# prompt tuning (reference §5).
SUPPORTED = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning",
             "PREFIX_TUNING": "prefix_tuning"}

# where each model family keeps its blocks, as a module-path prefix
BLOCK_PREFIX = {"gpt2": "transformer.h.", "llama": "model.layers."}

# adapter parameters per peft_type: key suffix after the module path
ADAPTER_PARAMS = {"LORA": ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector"), "IA3": ("ia3_l",)}

# parameter names of methods/variants we do not implement, to name them in the error
FOREIGN_PARAMS = {
    "lora_embedding_A": "LoRA on an embedding layer",
    "lora_embedding_B": "LoRA on an embedding layer",
    "hada_w1_a": "LoHa", "lokr_w1": "LoKr", "lokr_w1_a": "LoKr", "vera_lambda_b": "VeRA",
}

# LoRA inits that change the base weights when the adapter is created; PEFT redoes them on
# load, so the saved A/B only make sense against a mutated base (reference §2.8)
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")

# LoRA variants with a different forward; any non-null/true value is refused
LORA_VARIANT_FLAGS = ("alora_invocation_tokens", "arrow_config", "use_bdlora", "velora_config",
                      "monteclora_config", "kasa_config", "use_qalora")


def read_peft(directory: Path, info: ModelInfo, name: str | None = None) -> Adapter:
    """A `save_pretrained` directory -> `Adapter` (CPU, fp32), every tensor checked against `info`."""
    config = read_json(directory / "adapter_config.json")
    peft_type = config.get("peft_type")
    if peft_type not in SUPPORTED:
        raise AdapterUnsupported(
            f"PEFT peft_type {peft_type!r} is not supported; supported: {', '.join(SUPPORTED)}")
    check_base(config, info)
    tensors = read_tensors(directory, WEIGHT_FILES)
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise AdapterFormatError(f"tensor {key} has dtype {t.dtype}; adapter weights must be floating point")
    name = name or directory.name
    method = SUPPORTED[peft_type]
    if peft_type in ("LORA", "IA3"):
        linear = read_injected(peft_type, config, tensors, info)
        return Adapter(name, "peft", method, config, linear=linear)
    embeddings = only_tensor(tensors, "prompt_embeddings")
    if peft_type == "PREFIX_TUNING":
        return Adapter(name, "peft", method, config, prefix=read_prefix(config, embeddings, info))
    return Adapter(name, "peft", method, config, prompt=read_prompt(config, embeddings, info))


# --------------------------------------------------------------------------- base model checks


def check_base(config: dict, info: ModelInfo) -> None:
    """The adapter must be for a causal LM of the base model's type, when the config says."""
    task = config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise AdapterUnsupported(f"task_type {task!r} is not supported; only CAUSAL_LM adapters can serve completions")
    mapping = config.get("auto_mapping") or {}
    cls = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    if isinstance(cls, str) and cls:
        # "GPT2LMHeadModel" -> "gpt2", "LlamaForCausalLM" -> "llama", "Qwen2ForCausalLM" -> "qwen2"
        model_type = re.split(r"For|LMHead|Model", cls)[0].lower()
        if model_type != info.model_type:
            raise AdapterIncompatible(
                f"adapter was saved for {cls} (model_type {model_type!r}), the base model is {info.model_type!r}")


# --------------------------------------------------------------------------- injected methods


def read_injected(peft_type: str, config: dict, tensors: dict[str, Tensor], info: ModelInfo) -> dict:
    """LoRA or (IA)^3: group tensors by (layer, module) site, then build one effect per site."""
    check_injected_options(peft_type, config)
    sites: dict[tuple[int, str], dict[str, Tensor]] = {}
    paths: dict[tuple[int, str], str] = {}
    for key, t in tensors.items():
        layer, module, param, path = parse_key(key, peft_type, config, info)
        sites.setdefault((layer, module), {})[param] = t
        paths[(layer, module)] = path
    if not sites:
        raise AdapterFormatError("adapter_model holds no adapter tensors")
    build = lora_effect if peft_type == "LORA" else ia3_effect
    return {site: build(paths[site], info.linear_shapes[site[1]], params, config)
            for site, params in sorted(sites.items())}


def check_injected_options(peft_type: str, config: dict) -> None:
    """Refuse options that replace or mutate base weights, or change the structure or math."""
    if config.get("trainable_token_indices"):
        raise AdapterUnsupported(
            "trainable_token_indices is not supported: it replaces rows of the base embedding matrix")
    if config.get("layer_replication"):
        raise AdapterUnsupported("layer_replication is not supported: it changes the base model's layer structure")
    if config.get("target_parameters"):
        raise AdapterUnsupported("target_parameters (LoRA on raw parameters) is not supported")
    if peft_type != "LORA":
        return
    if config.get("use_dora") and config.get("lora_bias"):
        raise AdapterUnsupported("use_dora together with lora_bias is not supported")
    for flag in LORA_VARIANT_FLAGS:
        if config.get(flag):
            raise AdapterUnsupported(f"LoRA variant option {flag}={config[flag]!r} is not supported")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS):
        raise AdapterUnsupported(
            f"init_lora_weights={init!r} is not supported: that init modifies the base weights, so the adapter "
            "only works on a mutated base (convert it with path_initial_model_for_weight_conversion first)")


def parse_key(key: str, peft_type: str, config: dict, info: ModelInfo) -> tuple[int, str, str, str]:
    """`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`
    -> (0, "attn.c_attn", "lora_A.weight", "transformer.h.0.attn.c_attn")."""
    path = key.removeprefix("base_model.model.")
    param = next((p for p in ADAPTER_PARAMS[peft_type] if path.endswith("." + p)), None)
    if param is None:
        raise refuse_key(key, config)
    path = path[: -len(param) - 1]
    block = BLOCK_PREFIX[info.family]
    m = re.fullmatch(re.escape(block) + r"(\d+)\.(.+)", path)
    if m is None:
        other = next((f for f, p in BLOCK_PREFIX.items() if path.startswith(p)), None)
        if other is not None and other != info.family:
            raise AdapterIncompatible(f"tensor {key} is for a {other}-style model, the base model is {info.model_type}")
        raise AdapterUnsupported(f"tensor {key} targets module {path!r}, which has no adapter site "
                                 f"(supported: the linear layers {', '.join(info.linear_shapes)} of each block)")
    layer, module = int(m.group(1)), m.group(2)
    if layer >= info.num_layers:
        raise AdapterIncompatible(f"tensor {key} is for layer {layer}, the base model has {info.num_layers} layers")
    if module not in info.linear_shapes:
        raise AdapterUnsupported(f"tensor {key} targets module {module!r}, which has no adapter site "
                                 f"(supported: {', '.join(info.linear_shapes)})")
    return layer, module, param, path


def refuse_key(key: str, config: dict) -> Exception:
    """Why a key is not an adapter tensor: name the option that put it there."""
    for param, what in FOREIGN_PARAMS.items():
        if f".{param}" in key:
            return AdapterUnsupported(f"tensor {key} belongs to {what}, which is not supported")
    if "token_adapter" in key:
        return AdapterUnsupported(f"tensor {key} comes from trainable_token_indices (replaces embedding rows), "
                                  "which is not supported")
    if config.get("modules_to_save"):
        return AdapterUnsupported(f"modules_to_save={config['modules_to_save']} is not supported: tensor {key} "
                                  "is a full copy of a base module that would replace base weights")
    if config.get("bias", "none") != "none":
        return AdapterUnsupported(f"bias={config['bias']!r} is not supported: tensor {key} is a trained base "
                                  "bias that would replace the base model's")
    if key.endswith(("embed_tokens.base_layer.weight", "lm_head.base_layer.weight", "wte.base_layer.weight")):
        return AdapterUnsupported(f"tensor {key} is a full base embedding saved with an embedding LoRA target; "
                                  "it would replace base weights, which is not supported")
    return AdapterUnsupported(f"tensor {key} is not an adapter tensor (it would override a base weight); "
                              "not supported")


def pattern_key(patterns: dict, path: str) -> str:
    """PEFT's get_pattern_key: the first pattern, in dict order, that matches the end of the
    module path at a '.' boundary; else the path itself."""
    for pattern in patterns:
        try:
            if re.match(rf"(.*\.)?({pattern})$", path):
                return pattern
        except re.error as e:
            raise AdapterFormatError(f"rank_pattern/alpha_pattern key {pattern!r} is not a valid regex: {e}") from None
    return path


def lora_effect(path: str, shape: tuple[int, int], params: dict[str, Tensor], config: dict) -> LoRA:
    """y += scale * (x @ A.T @ B.T + bias), scale = alpha/r (rsLoRA: alpha/sqrt(r)) with r and
    alpha resolved per module path by rank_pattern / alpha_pattern."""
    missing = [p for p in ("lora_A.weight", "lora_B.weight") if p not in params]
    if missing:
        raise AdapterFormatError(f"module {path} lacks {', '.join(missing)}")
    A, B = params["lora_A.weight"], params["lora_B.weight"]
    fan_in, fan_out = shape
    r = A.shape[0] if A.dim() == 2 else -1
    expect_shape(f"{path}.lora_A.weight", A, (r, fan_in))
    expect_shape(f"{path}.lora_B.weight", B, (fan_out, r))
    bias = params.get("lora_B.bias")
    if bias is not None:
        expect_shape(f"{path}.lora_B.bias", bias, (fan_out,))
    # the rank in the config (after rank_pattern) is what PEFT built the layer with; it sets the scale
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise AdapterFormatError("rank_pattern and alpha_pattern must be JSON objects (regex -> value)")
    config_r = rank_pattern.get(pattern_key(rank_pattern, path), config.get("r", 8))
    alpha = alpha_pattern.get(pattern_key(alpha_pattern, path), config.get("lora_alpha", 8))
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterFormatError(f"lora_alpha for {path} must be a number, got {alpha!r}")
    if config_r != r:
        raise AdapterFormatError(f"tensor {path}.lora_A.weight has rank {r}, adapter_config.json says r={config_r}")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    magnitude = params.get("lora_magnitude_vector")  # DoRA: per-output-row magnitude (peft §2.6)
    if bool(config.get("use_dora")) != (magnitude is not None):
        raise AdapterFormatError(f"module {path}: use_dora={config.get('use_dora')!r} but lora_magnitude_vector is "
                                 f"{'present' if magnitude is not None else 'missing'}")
    if magnitude is not None:
        magnitude = expect_shape(f"{path}.lora_magnitude_vector", magnitude, (fan_out,)).contiguous()
    return LoRA(A=A.contiguous(), B=B.contiguous(), scale=float(scale), bias=bias, magnitude=magnitude)


def ia3_effect(path: str, shape: tuple[int, int], params: dict[str, Tensor], config: dict) -> Scale:
    """ia3_l [out, 1] scales the output (bias included); [1, in] (feed-forward) scales the
    input. The shape alone tells the two apart (reference §3)."""
    fan_in, fan_out = shape
    l = params["ia3_l"]
    if tuple(l.shape) == (fan_out, 1):
        return Scale(vector=l.reshape(fan_out).contiguous(), on_input=False)
    if tuple(l.shape) == (1, fan_in):
        return Scale(vector=l.reshape(fan_in).contiguous(), on_input=True)
    raise AdapterIncompatible(f"tensor {path}.ia3_l has shape {list(l.shape)}, the base model needs "
                              f"{[fan_out, 1]} (output scaling) or {[1, fan_in]} (feed-forward input scaling)")


# --------------------------------------------------------------------------- prompt learning


def only_tensor(tensors: dict[str, Tensor], key: str) -> Tensor:
    """Prompt-learning files hold exactly one tensor; anything else is an override we refuse."""
    extra = sorted(k for k in tensors if k != key)
    if extra:
        raise AdapterUnsupported(f"tensor {extra[0]} is not an adapter tensor (prompt-learning adapters hold only "
                                 f"{key!r}); full base weight overrides are not supported")
    if key not in tensors:
        raise AdapterFormatError(f"adapter_model lacks the tensor {key!r}")
    return tensors[key]


def config_int(config: dict, field: str) -> int:
    value = config.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise AdapterFormatError(f"adapter_config.json field {field} must be a positive integer, got {value!r}")
    return value


def check_submodules(config: dict) -> None:
    n = config.get("num_transformer_submodules") or 1
    if n != 1:
        raise AdapterUnsupported(f"num_transformer_submodules={n} (encoder-decoder prompts) is not supported")


def read_prompt(config: dict, embeddings: Tensor, info: ModelInfo) -> Prompt:
    """Prompt tuning / P-tuning: `prompt_embeddings` [n, H] precede the real tokens."""
    check_submodules(config)
    n, dim = config_int(config, "num_virtual_tokens"), config_int(config, "token_dim")
    if dim != info.hidden_size:
        raise AdapterIncompatible(f"token_dim={dim} in adapter_config.json, the base model's hidden size is "
                                  f"{info.hidden_size}")
    return Prompt(embeddings=expect_shape("prompt_embeddings", embeddings, (n, info.hidden_size)).contiguous())


def read_prefix(config: dict, embeddings: Tensor, info: ModelInfo) -> Prefix:
    """Prefix tuning: `prompt_embeddings` [P, L*2*token_dim] is the final KV, laid out per
    column as [layer][k|v][head][dim] with the CONFIG's heads (PEFT rewrites them to the KV
    heads on GQA models). Real tokens are numbered from P (reference §6.4)."""
    check_submodules(config)
    P, L = config_int(config, "num_virtual_tokens"), config_int(config, "num_layers")
    heads, dim = config_int(config, "num_attention_heads"), config_int(config, "token_dim")
    if L != info.num_layers:
        raise AdapterIncompatible(f"num_layers={L} in adapter_config.json, the base model has {info.num_layers} layers")
    if heads != info.num_kv_heads or dim != heads * info.head_dim:
        raise AdapterIncompatible(
            f"prefix has num_attention_heads={heads}, token_dim={dim}; the base model needs {info.num_kv_heads} "
            f"KV heads of size {info.head_dim} (token_dim {info.num_kv_heads * info.head_dim})")
    expect_shape("prompt_embeddings", embeddings, (P, L * 2 * dim))
    d = dim // heads
    kv = embeddings.view(P, 2 * L, heads, d).permute(1, 2, 0, 3)  # [2L, H, P, d]
    keys = {i: kv[2 * i].contiguous() for i in range(L)}  # [H, P, d], no RoPE on prefix keys
    values = {i: kv[2 * i + 1].contiguous() for i in range(L)}
    return Prefix(keys=keys, values=values, length=P, shifts_positions=True)
