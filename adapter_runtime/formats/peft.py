"""Reader for Hugging Face PEFT `save_pretrained` directories (PEFT 0.21.2 semantics).

A directory holds `adapter_config.json` and `adapter_model.safetensors` (or the legacy
`adapter_model.bin`, read with weights_only=True). See shared/reference/peft-format.md.

The set of adapted modules comes from the tensor KEYS, never from re-running PEFT's target
matching: `target_modules` may be a regex, "all-linear" is expanded before saving, and keys
are what PEFT itself loads. The config only supplies scales and flags that change the math.

Supported: LoRA (rank/alpha patterns, rsLoRA, lora_bias, DoRA; fan_in_fan_out only matters
for merging), (IA)^3 (output and feed-forward input scaling), prompt tuning, P-tuning, prefix
tuning (with or without projection: the file holds the final KV), and the methods whose delta
is a product of small factors, read as an exact LoRA (formats/as_lora.py): VeRA, LoHa, LoKr,
AdaLoRA. Everything that replaces or mutates base weights, changes the model structure, or uses
different math is refused with a typed error naming the option.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import torch
from torch import Tensor

from ..adapters import Adapter, LoRA, Prefix, Prompt, Scale
from ..errors import AdapterFormatError, AdapterIncompatible, AdapterUnsupported
from ..models.common import ModelInfo
from . import as_lora, expect_shape, read_json, read_tensors

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

# peft_type -> our method name. P-tuning saves its encoder's output, so at inference it is
# prompt tuning (reference §5).
SUPPORTED = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning",
             "PREFIX_TUNING": "prefix_tuning", "VERA": "vera", "LOHA": "loha", "LOKR": "lokr", "ADALORA": "adalora"}

# where each model family keeps its blocks, as a module-path prefix
BLOCK_PREFIX = {"gpt2": "transformer.h.", "llama": "model.layers."}

# adapter parameters per peft_type: key suffix after the module path
ADAPTER_PARAMS = {
    "LORA": ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector"),
    "IA3": ("ia3_l",),
    "VERA": ("vera_lambda_b", "vera_lambda_d"),
    "LOHA": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "LOKR": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    "ADALORA": ("lora_A", "lora_B", "lora_E"),
}
INJECTED = tuple(ADAPTER_PARAMS)
# VeRA's projections, shared by every layer, sit outside the module tree (reference §1.2)
VERA_PROJECTIONS = ("base_model.vera_A", "base_model.vera_B")

# parameter names of methods/variants we do not implement, to name them in the error
FOREIGN_PARAMS = {
    "lora_embedding_A": "LoRA on an embedding layer",
    "lora_embedding_B": "LoRA on an embedding layer",
    "hada_t1": "LoHa's CP decomposition of a convolution kernel (use_effective_conv2d)",
    "lokr_t2": "LoKr's CP decomposition of a convolution kernel (use_effective_conv2d)",
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
    if peft_type in INJECTED:
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
    """An injected method: group tensors by (layer, module) site, then build one effect per site."""
    check_injected_options(peft_type, config)
    tensors = dict(tensors)
    shared = {key: tensors.pop(key) for key in VERA_PROJECTIONS if key in tensors} if peft_type == "VERA" else {}
    sites: dict[tuple[int, str], dict[str, Tensor]] = {}
    paths: dict[tuple[int, str], str] = {}
    for key, t in tensors.items():
        layer, module, param, path = parse_key(key, peft_type, config, info)
        sites.setdefault((layer, module), {})[param] = t
        paths[(layer, module)] = path
    if not sites:
        raise AdapterFormatError("adapter_model holds no adapter tensors")
    if peft_type == "VERA":
        projections = vera_projections(config, shared, [info.linear_shapes[m] for _, m in sites])
        build = functools.partial(vera_effect, projections=projections)
    else:
        build = {"LORA": lora_effect, "IA3": ia3_effect, "LOHA": loha_effect, "LOKR": lokr_effect,
                 "ADALORA": adalora_effect}[peft_type]
    effects = {site: build(paths[site], info.linear_shapes[site[1]], params, config)
               for site, params in sorted(sites.items())}
    return {site: e for site, e in effects.items() if e is not None}


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


def patterned(config: dict, path: str, pattern_field: str, field: str, default):
    """The value of `field` for one module: rank_pattern / alpha_pattern win over the default
    (first matching regex in dict order, anchored at the end of the path)."""
    patterns = config.get(pattern_field) or {}
    if not isinstance(patterns, dict):
        raise AdapterFormatError(f"{pattern_field} must be a JSON object (regex -> value)")
    value = patterns.get(pattern_key(patterns, path), config.get(field, default))
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise AdapterFormatError(f"{field} for {path} must be a number, got {value!r}")
    return value


def take(params: dict[str, Tensor], path: str, name: str, shape: tuple[int, ...]) -> Tensor:
    if name not in params:
        raise AdapterFormatError(f"module {path} lacks {name}")
    return expect_shape(f"{path}.{name}", params[name], shape)


def vera_projections(config: dict, shared: dict[str, Tensor], shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """VeRA's frozen A [r, max_in] and B [max_out, r], shared by every adapted layer (each
    slices its own [:, :in] / [:out, :]). Saved by default; with save_projection=false PEFT
    regenerates them from projection_prng_key, and so do we, the same way."""
    r = config_int(config, "r")
    max_in, max_out = max(s[0] for s in shapes), max(s[1] for s in shapes)
    if config.get("save_projection", True):
        missing = [k for k in VERA_PROJECTIONS if k not in shared]
        if missing:
            raise AdapterFormatError(f"VeRA adapter_config.json says save_projection=true but {missing[0]} is missing")
        A, B = shared["base_model.vera_A"], shared["base_model.vera_B"]
        if A.dim() != 2 or A.shape[0] != r or A.shape[1] < max_in:
            raise AdapterIncompatible(f"tensor base_model.vera_A has shape {list(A.shape)}, the adapted layers need "
                                      f"[{r}, >= {max_in}]")
        if B.dim() != 2 or B.shape[1] != r or B.shape[0] < max_out:
            raise AdapterIncompatible(f"tensor base_model.vera_B has shape {list(B.shape)}, the adapted layers need "
                                      f"[>= {max_out}, {r}]")
        return A, B
    key = config.get("projection_prng_key", 0)
    if not isinstance(key, int) or isinstance(key, bool):
        raise AdapterFormatError(f"projection_prng_key must be an integer, got {key!r}")
    generator = torch.Generator(device="cpu").manual_seed(key)
    return kaiming_uniform((r, max_in), generator), kaiming_uniform((max_out, r), generator)


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """PEFT's VeRA init: U(-b, b) with b = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def vera_effect(path: str, shape: tuple[int, int], params: dict[str, Tensor], config: dict,
                projections: tuple[Tensor, Tensor]) -> LoRA:
    """VeRA: y += lambda_b * ((lambda_d * (x @ A[:, :in].T)) @ B[:out, :].T), i.e. the LoRA
    A' = diag(lambda_d) A[:, :in], B' = diag(lambda_b) B[:out, :], scale 1 (no alpha)."""
    fan_in, fan_out = shape
    A, B = projections
    r = A.shape[0]
    lambda_b = take(params, path, "vera_lambda_b", (fan_out,))
    lambda_d = take(params, path, "vera_lambda_d", (r,))
    return as_lora.low_rank(lambda_b[:, None] * B[:fan_out], lambda_d[:, None] * A[:, :fan_in], 1.0)


def loha_effect(path: str, shape: tuple[int, int], params: dict[str, Tensor], config: dict) -> LoRA:
    """LoHa: dW = ((w1a @ w1b) * (w2a @ w2b)) * alpha / r, r and alpha per module (patterns)."""
    fan_in, fan_out = shape
    r = patterned(config, path, "rank_pattern", "r", 8)
    alpha = patterned(config, path, "alpha_pattern", "alpha", 8)
    w1a, w2a = (take(params, path, n, (fan_out, r)) for n in ("hada_w1_a", "hada_w2_a"))
    w1b, w2b = (take(params, path, n, (r, fan_in)) for n in ("hada_w1_b", "hada_w2_b"))
    return as_lora.hadamard(w1a, w1b, w2a, w2b, alpha / r)


def lokr_effect(path: str, shape: tuple[int, int], params: dict[str, Tensor], config: dict) -> LoRA:
    """LoKr: dW = kron(W1, W2) * alpha / r, each factor full (lokr_w1) or low-rank
    (lokr_w1_a @ lokr_w1_b); r and alpha per module (patterns) set the scale even where both
    factors are full. W1 [a1, b1], W2 [a2, b2] with a1*a2 = out, b1*b2 = in."""
    fan_in, fan_out = shape
    r = patterned(config, path, "rank_pattern", "r", 8)
    alpha = patterned(config, path, "alpha_pattern", "alpha", 8)

    def factor(n: int) -> tuple:
        full, a, b = (params.get(f"lokr_w{n}{suffix}") for suffix in ("", "_a", "_b"))
        if full is not None and a is None and b is None and full.dim() == 2:
            return full, None, None
        if full is None and a is not None and b is not None and a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0]:
            return None, a, b
        raise AdapterFormatError(f"module {path}: LoKr factor {n} needs lokr_w{n} or both lokr_w{n}_a and lokr_w{n}_b")

    w1, w2 = factor(1), factor(2)
    rows = [f[0].shape[0] if f[0] is not None else f[1].shape[0] for f in (w1, w2)]
    cols = [f[0].shape[1] if f[0] is not None else f[2].shape[1] for f in (w1, w2)]
    if rows[0] * rows[1] != fan_out or cols[0] * cols[1] != fan_in:
        raise AdapterIncompatible(f"module {path}: kron of LoKr factors {rows[0]}x{cols[0]} and {rows[1]}x{cols[1]} "
                                  f"is {rows[0] * rows[1]}x{cols[0] * cols[1]}, the base layer is {fan_out}x{fan_in}")
    return as_lora.kronecker(w1, w2, alpha / r)


def adalora_effect(path: str, shape: tuple[int, int], params: dict[str, Tensor], config: dict) -> LoRA | None:
    """AdaLoRA (SVD-form LoRA): y += (x @ (A * E).T @ B.T) * alpha / (ranknum + 1e-5).

    The saved tensors are already cut to the ranks kept by the rank allocation (rank_pattern
    in the config records the masks); ranknum stays init_r, the rank the layer was created
    with, so the scale is alpha / init_r even after pruning (PEFT resize_modules_by_rank_pattern).
    With lora_alpha <= 0 the numerator is the layer's rank. A module cut to rank 0 adds nothing."""
    fan_in, fan_out = shape
    init_r = config_int(config, "init_r")
    A = params.get("lora_A")
    k = A.shape[0] if A is not None and A.dim() == 2 else -1
    A = take(params, path, "lora_A", (k, fan_in))
    E = take(params, path, "lora_E", (k, 1))
    B = take(params, path, "lora_B", (fan_out, k))
    if k > init_r:
        raise AdapterFormatError(f"module {path} has rank {k}, more than init_r={init_r}")
    if k == 0:
        return None
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterFormatError(f"lora_alpha must be a number, got {alpha!r}")
    numerator = alpha if alpha > 0 else float(k if config.get("rank_pattern") else init_r)
    return LoRA(A=(A * E).contiguous(), B=B.contiguous(), scale=float(numerator / (init_r + 1e-5)))


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
