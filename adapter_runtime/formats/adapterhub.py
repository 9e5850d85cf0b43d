"""Reader for AdapterHub `adapters` 1.3.0 directories (`model.save_adapter()`), and the rule for
which stacks of adapters the runtime can compose.

A directory holds `adapter_config.json` and `adapter.safetensors` or `pytorch_adapter.bin`
(head files are ignored: they only repeat the tied embedding). Every tensor is checked against
the base model and every key of the file must be used, so that a renamed or misplaced tensor
is an error rather than a silently missing adapter. The math and traps are those of
shared/reference/adapterhub-format.md (cited as §n below).

    bottleneck (BnConfig, SeqBn, DoubleSeqBn, ParBn, Compacter*, *Inv)  -> Bottleneck per (layer, loc)
                                                                        (+ Invertible for *Inv)
    lora, composition_mode "add" (also VeRA, DoRA, DvoRA, MTL-LoRA)     -> LoRA per (layer, module)
    lora, composition_mode "scale" (IA3)                                -> Scale per (layer, module)
    prefix_tuning (MLP evaluated once here, flat, ejected)              -> Prefix
    union (MAM, UniPELT, ConfigUnion)                                   -> the parts merged
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from packaging.version import InvalidVersion, Version
from torch import Tensor

from ..adapters import Adapter, Bottleneck, Invertible, LinearEffect, LMHead, LoRA, Prefix, Scale
from ..errors import AdapterFormatError, AdapterIncompatible, AdapterUnsupported, InvalidRequest
from ..methods.bottleneck import activation, phm_weight
from ..models.common import ModelInfo
from . import expect_shape, read_json, read_tensors

WEIGHT_FILES = ("adapter.safetensors", "pytorch_adapter.bin")

# ----------------------------------------------------------------------------- key mapping
# One table: where each config location lives, per model family. Keys of the file (after the
# base prefix and the adapter name are stripped) are "{layer}.{module}.loras.lora_A" etc., and
# our sites use the same HF module paths. Llama's LoRA locations are swapped in the library
# (§5.1): "intermediate" wraps down_proj and "output" wraps up_proj.
LORA_MODULES = {
    "gpt2": {"selfattn": "attn.c_attn", "intermediate": "mlp.c_fc", "output": "mlp.c_proj"},
    "llama": {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "intermediate": "mlp.down_proj",
        "output": "mlp.up_proj",
    },
}
# bottleneck config flag -> (key container, our location)
BOTTLENECK_LOCATIONS = {"mh_adapter": ("attention_adapters", "attn"), "output_adapter": ("output_adapters", "ffn")}

BASE_PREFIXES = ("transformer.", "model.")  # GPT2LMHeadModel / LlamaForCausalLM; bare models: none
LAYER_KEY = re.compile(r"^(?:h|layers)\.(\d+)\.(.*)$")
# the adapter name follows one of these module containers in every key
NAME_CONTAINERS = "adapters|loras|prefix_tunings|invertible_adapters|shared_parameters|prefix_gates|prompt_tunings"
NAME_IN_KEY = re.compile(rf"(^|\.)({NAME_CONTAINERS})\.([^.]+)\.")
# adapter-transformers v1 key names that the library still renames at load
LEGACY_KEY_NAMES = {
    "attention_text_task_adapters": "adapters",
    "attention_text_lang_adapters": "adapters",
    "layer_text_task_adapters": "adapters",
    "layer_text_lang_adapters": "adapters",
    "invertible_lang_adapters": "invertible_adapters",
}
LEGACY_ACTIVATIONS = {"gelu": "gelu_new", "gelu_orig": "gelu"}  # files without `version`
PREFIX_ALIAS = "prefix_tuning.pool.prefix_tunings."  # per-layer copies of the canonical prefix


# ----------------------------------------------------------------------------- tensors of a file


class Weights:
    """The file's tensors under normalized keys: "{layer}.{path}" or a global "{path}", with the
    base prefix and the adapter name removed. Readers `take` what the config implies; whatever
    nobody took is an error (`check_all_used`)."""

    def __init__(self, tensors: Mapping[str, Tensor], name: str | None, info: ModelInfo):
        self.tensors: dict[str, Tensor] = {}
        self.original: dict[str, str] = {}  # normalized key -> key in the file, for messages
        self.used: set[str] = set()
        name = self._adapter_name(tensors, name)
        for key, t in tensors.items():
            norm = self._normalize(key, name, info)
            if norm is not None:
                self.tensors[norm] = t
                self.original[norm] = key

    @staticmethod
    def _adapter_name(tensors: Mapping[str, Tensor], name: str | None) -> str:
        """The config's `name` if the keys carry it, else the one name all keys agree on."""
        found = {m.group(3) for k in tensors if (m := NAME_IN_KEY.search(_legacy(k)))}
        if name in found or not found:
            return name or ""
        if len(found) == 1:
            return found.pop()
        raise AdapterFormatError(f"weight keys name several adapters ({', '.join(sorted(found))}), none is {name!r}")

    @staticmethod
    def _normalize(key: str, name: str, info: ModelInfo) -> str | None:
        k = _legacy(key)
        for prefix in BASE_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        if PREFIX_ALIAS in k:  # same storage as the canonical prefix (§1.3): ignore
            return None
        k, found = re.subn(rf"(^|\.)({NAME_CONTAINERS})\.{re.escape(name)}\.", r"\1\2.", k, count=1)
        if not found:
            raise AdapterFormatError(f"weight key {key} does not belong to adapter {name!r}")
        if m := LAYER_KEY.match(k):
            layer = int(m.group(1))
            if layer >= info.num_layers:
                raise AdapterIncompatible(f"weight key {key} is for layer {layer}, the base model has {info.num_layers} layers")
            return f"{layer}.{m.group(2)}"
        return k

    def has(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str, shape: Sequence[int]) -> Tensor:
        if key not in self.tensors:
            raise AdapterFormatError(f"missing tensor {key!r} (expected shape {list(shape)}) in the weights file")
        self.used.add(key)
        return expect_shape(self.original[key], self.tensors[key], tuple(shape))

    def take_if(self, present: bool, key: str, shape: Sequence[int]) -> Tensor | None:
        return self.take(key, shape) if present else None

    def check_all_used(self) -> None:
        unused = sorted(self.original[k] for k in self.tensors.keys() - self.used)
        if unused:
            more = f" (and {len(unused) - 3} more)" if len(unused) > 3 else ""
            raise AdapterFormatError(f"weights file holds tensors the config does not explain: {', '.join(unused[:3])}{more}")


def _legacy(key: str) -> str:
    for old, new in LEGACY_KEY_NAMES.items():
        key = key.replace(old, new)
    return key


# ----------------------------------------------------------------------------- one config part


@dataclass
class Part:
    """What one (sub-)config contributes; a union merges several."""

    method: str
    linear: dict[tuple[int, str], LinearEffect] = field(default_factory=dict)
    bottleneck: dict[tuple[int, str], Bottleneck] = field(default_factory=dict)
    invertible: Invertible | None = None
    prefix: Prefix | None = None


def _layers(config: Mapping, info: ModelInfo) -> list[int]:
    leave_out = config.get("leave_out") or []
    if not isinstance(leave_out, list) or not all(isinstance(i, int) for i in leave_out):
        raise AdapterFormatError(f"leave_out must be a list of layer indices, got {leave_out!r}")
    return [i for i in range(info.num_layers) if i not in set(leave_out)]


def _activation_name(name) -> str:
    if not isinstance(name, str):
        raise AdapterFormatError(f"non_linearity must be a string, got {name!r}")
    try:
        activation(name)
    except Exception:
        raise AdapterUnsupported(f"unknown non_linearity {name!r}") from None
    return name


# ---- bottleneck family (§1.3 module internals, §3.1, §3.2)


def _reduction_factor(config: Mapping, layer: int) -> float:
    rf = config.get("reduction_factor")
    if isinstance(rf, Mapping):
        rf = rf.get(str(layer), rf.get("default"))
    if isinstance(rf, bool) or not isinstance(rf, (int, float)) or rf <= 0:
        raise AdapterFormatError(f"reduction_factor for layer {layer} must be a positive number, got {rf!r}")
    return rf


def _scaling(config: Mapping, w: Weights, p: str, H: int) -> float | Tensor:
    scaling = config.get("scaling", 1.0)
    if scaling == "learned":
        return w.take(p + "scaling", (1,))
    if scaling == "channel":
        return w.take(p + "scaling", (H,))
    if isinstance(scaling, (int, float)) and not isinstance(scaling, bool):
        return float(scaling)  # the library insists on a JSON float; an int means the same
    raise AdapterUnsupported(f"unknown bottleneck scaling {scaling!r}; expected a number, 'learned' or 'channel'")


def _phm(config: Mapping, w: Weights, p: str, position: str, n_in: int, n_out: int) -> tuple[Tensor, Tensor | None]:
    """A Compacter PHM layer at key prefix `p` -> dense nn.Linear (weight [out, in], bias [out])."""
    n, rank = config.get("phm_dim", 4), config.get("phm_rank", 1)
    if n_in % n or n_out % n:
        raise AdapterIncompatible(f"PHM layer {p}{position} is {n_in}x{n_out}, not divisible by phm_dim {n}")
    a, b = n_in // n, n_out // n
    if config.get("shared_W_phm"):  # one W per adapter for all layers
        s = f"shared_parameters.W_{position}"
        if config.get("factorized_phm_W", True):
            W = torch.bmm(w.take(s + "_left", (n, a, rank)), w.take(s + "_right", (n, rank, b)))
        else:
            W = w.take(s, (n, a, b))
    elif config.get("factorized_phm_W", True):
        W = torch.bmm(w.take(p + "W_left", (n, a, rank)), w.take(p + "W_right", (n, rank, b)))
    else:
        W = w.take(p + "W", (n, a, b))
    r = "shared_parameters." if config.get("shared_phm_rule", True) else p  # shared: one rule everywhere
    if config.get("factorized_phm_rule"):
        rule = torch.bmm(w.take(r + "phm_rule_left", (n, n, 1)), w.take(r + "phm_rule_right", (n, 1, n)))
    else:
        rule = w.take(r + "phm_rule", (n, n, n))
    bias = w.take_if(config.get("phm_bias", True), p + "b", (n_out,))
    return phm_weight(rule, W).T.contiguous(), bias  # PHM is x @ H [in, out]; nn.Linear wants [out, in]


def _projection(config: Mapping, w: Weights, p: str, position: str, n_in: int, n_out: int):
    if config.get("phm_layer"):
        return _phm(config, w, p, position, n_in, n_out)
    return w.take(p + "weight", (n_out, n_in)), w.take(p + "bias", (n_out,))


def _layer_norm(w: Weights, p: str, H: int) -> tuple[Tensor, Tensor]:
    return w.take(p + "weight", (H,)), w.take(p + "bias", (H,))


def _bottleneck(config: Mapping, w: Weights, p: str, layer: int, H: int) -> Bottleneck:
    """One BnConfig adapter at key prefix p = "{layer}.{container}.adapters."."""
    residual_before_ln = config.get("residual_before_ln", True)
    if not isinstance(residual_before_ln, bool):  # "post_add" crashes in the library on GPT-2/Llama (§3.1)
        raise AdapterUnsupported(f"residual_before_ln={residual_before_ln!r} is not supported (only true/false)")
    d = max(1, int(H // _reduction_factor(config, layer)))
    ln_before = None
    down = "adapter_down.0."
    if config.get("ln_before"):  # the LN is adapter_down.0 (saved twice), the Linear moves to .1
        ln_before = _layer_norm(w, p + "adapter_norm_before.", H)
        _layer_norm(w, p + "adapter_down.0.", H)
        down = "adapter_down.1."
    down_w, down_b = _projection(config, w, p + down, "down", H, d)
    up_w, up_b = _projection(config, w, p + "adapter_up.", "up", d, H)
    return Bottleneck(
        down_weight=down_w,  # [d, H]
        down_bias=down_b,
        up_weight=up_w,  # [H, d]
        up_bias=up_b,
        activation=_activation_name(config.get("non_linearity", "relu")),
        scaling=_scaling(config, w, p, H),
        residual_before_ln=residual_before_ln,
        adapter_residual_before_ln=bool(config.get("adapter_residual_before_ln")),
        original_ln_before=bool(config.get("original_ln_before", True)),
        original_ln_after=bool(config.get("original_ln_after", True)),
        is_parallel=bool(config.get("is_parallel")),
        ln_before=ln_before,
        ln_after=_layer_norm(w, p + "adapter_norm_after.", H) if config.get("ln_after") else None,
        gate=(w.take(p + "gate.weight", (1, H)), w.take(p + "gate.bias", (1,))) if config.get("use_gating") else None,
    )


def _invertible(config: Mapping, w: Weights, H: int) -> Invertible | None:
    """NICE (§3.3): F maps the second half (l2) to the first (l1), G the first to the second."""
    kind = config.get("inv_adapter")
    if not kind:
        return None
    if kind != "nice":
        raise AdapterUnsupported(f"invertible adapter {kind!r} is not supported (only 'nice'; 'glow' crashes in the library)")
    if not any(k.startswith("invertible_adapters.") for k in w.tensors):
        return None  # old task adapters name an invertible adapter they never saved: the library drops it
    rf = config.get("inv_adapter_reduction_factor") or 2
    l1, l2 = H // 2, H - H // 2
    f, g = int(l2 // rf), int(l1 // rf)
    t = lambda key, shape: w.take("invertible_adapters." + key, shape)  # noqa: E731
    return Invertible(
        f0_weight=t("F.0.weight", (f, l2)), f0_bias=t("F.0.bias", (f,)),
        f2_weight=t("F.2.weight", (l1, f)), f2_bias=t("F.2.bias", (l1,)),
        g0_weight=t("G.0.weight", (g, l1)), g0_bias=t("G.0.bias", (g,)),
        g2_weight=t("G.2.weight", (l2, g)), g2_bias=t("G.2.bias", (l2,)),
        activation=_activation_name(config.get("non_linearity", "relu")),
    )


def read_bottleneck(config: Mapping, w: Weights, info: ModelInfo) -> Part:
    H = info.hidden_size
    part = Part("compacter" if config.get("phm_layer") else "bottleneck")
    for layer in _layers(config, info):
        for flag, (container, location) in BOTTLENECK_LOCATIONS.items():
            if config.get(flag):
                part.bottleneck[(layer, location)] = _bottleneck(config, w, f"{layer}.{container}.adapters.", layer, H)
    part.invertible = _invertible(config, w, H)
    return part


# ---- LoRA and IA3 (§3.5, §3.6)


def _is_vera(config: Mapping) -> bool:
    """The library builds a Vera module iff vera_d or vera_b is a float (a JSON float), and
    MTL-LoRA wins over it."""
    return (isinstance(config.get("vera_d"), float) or isinstance(config.get("vera_b"), float)) and not _is_mtl(config)


def _is_mtl(config: Mapping) -> bool:
    return config.get("architecture") == "mtl_lora"


def _lora_method(config: Mapping) -> str:
    if config.get("composition_mode") == "scale":
        return "ia3"
    if _is_mtl(config):
        return "mtl_lora"
    dora = bool(config.get("use_dora"))
    if _is_vera(config):
        return "dvora" if dora else "vera"
    return "dora" if dora else "lora"


def _check_lora_options(config: Mapping, info: ModelInfo) -> None:
    """Refuse what the library cannot build or run, and the one DoRA form we cannot serve."""
    mode = config.get("composition_mode", "add")
    if mode not in ("add", "scale"):
        raise AdapterUnsupported(f"LoRA composition_mode {mode!r} is not supported")
    if mode == "scale" and config.get("use_gating"):
        raise AdapterUnsupported("IA3 (composition_mode 'scale') with use_gating is not supported")
    if mode == "scale" and config.get("use_dora"):
        raise AdapterUnsupported("IA3 (composition_mode 'scale') with use_dora: the library cannot build it")
    unknown = set(config.get("attn_matrices") or []) - set("qkvo")
    if unknown:
        raise AdapterUnsupported(f"attn_matrices {sorted(unknown)} are not supported (only q, k, v; o is ignored)")
    if _is_mtl(config):
        if config.get("use_dora"):
            raise AdapterUnsupported("MTL-LoRA with use_dora: the library cannot build it (MTLLoRA drops the base "
                                     "weight DoRA needs)")
        if config.get("task_specific_matrix_type", "singular_values") != "singular_values":
            raise AdapterUnsupported(f"MTL-LoRA task_specific_matrix_type={config.get('task_specific_matrix_type')!r}: "
                                     "the library cannot build it (only 'singular_values' works in adapters 1.3.0)")
    if config.get("use_dora"):
        if info.family == "gpt2":
            raise AdapterUnsupported("DoRA on GPT-2: the library cannot build it (its magnitude is sized from the "
                                     "Conv1D weight, stored [in, out])")
        if config.get("use_gating"):
            raise AdapterUnsupported("gated DoRA is not supported: its scale is a per-request gate while its norm uses "
                                     "the ungated delta")
        if config["r"] != config["alpha"]:
            raise AdapterUnsupported(
                f"AdapterHub DoRA with alpha ({config['alpha']}) != r ({config['r']}) is not supported: the library "
                "normalizes by ||W + B A|| without the alpha/r scale but adds the scaled delta, a form this server "
                "does not compute (with alpha == r it is exactly PEFT's DoRA, which is served)")
        if info.model_type == "qwen2":
            raise AdapterUnsupported("AdapterHub DoRA on a model with q/k/v biases is not supported: the library "
                                     "rescales the bias too")


def _lora_effect(config: Mapping, w: Weights, p: str, n_in: int, n_out: int) -> LinearEffect:
    """One LoRALinear at key prefix p = "{layer}.{module}.loras." (§3.5, §3.6), by method:
        LoRA      y += s (x A^T) B^T
        VeRA      y += s x (vera_B B vera_D A)^T       A, B shared by all layers (shared_parameters)
        MTL-LoRA  y += s x (sum_k w_k B_k diag(v) A)^T  w = softmax-like exp(weights / sharpness)
        DoRA      y = m / ||W + B A|| * (y + s (x A^T) B^T)   (served when s == 1, no bias: PEFT's form)
    s = alpha / r, or the gate mean_seq(sigmoid(gate(x))) when gated."""
    r, alpha = config["r"], config["alpha"]
    if config.get("composition_mode") == "scale":  # y * (alpha * b), bias included
        return Scale(alpha * w.take(p + "lora_B", (n_out, 1)).reshape(-1))
    gate = config.get("use_gating")
    if _is_vera(config):
        shared = [w.tensors.get(f"shared_parameters.lora_{m}") for m in "AB"]
        if all(t is not None for t in shared) and (shared[0].shape[1] != n_in or shared[1].shape[0] != n_out):
            raise AdapterUnsupported(
                f"VeRA at {p.rstrip('.')} ({n_in} -> {n_out}): the shared A/B are {[list(t.shape) for t in shared]}, "
                "sized from the first adapted layer; the library cannot run a VeRA whose layers differ in shape")
        A = w.take(p + "vera_D", (r, r)) @ w.take("shared_parameters.lora_A", (r, n_in))
        B = w.take(p + "vera_B", (n_out, n_out)) @ w.take("shared_parameters.lora_B", (n_out, r))
    elif _is_mtl(config):
        n, sharpness = config.get("n_up_projection", 1), config.get("weights_sharpness", 0.05)
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise AdapterFormatError(f"MTL-LoRA n_up_projection must be a positive integer, got {n!r}")
        if isinstance(sharpness, bool) or not isinstance(sharpness, (int, float)) or sharpness == 0:
            raise AdapterFormatError(f"MTL-LoRA weights_sharpness must be a non-zero number, got {sharpness!r}")
        weights = torch.exp(w.take(p + "weights", (n,)) / sharpness)
        B = torch.einsum("k,kor->or", weights / weights.sum(), w.take(p + "lora_B", (n, n_out, r)))
        A = w.take(p + "task_specific.values", (r,))[:, None] * w.take(p + "lora_A", (r, n_in))
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterFormatError(f"MTL-LoRA at {p.rstrip('.')}: exp(weights / weights_sharpness) overflows "
                                     "(the library computes NaN there)")
    else:
        A, B = w.take(p + "lora_A", (r, n_in)), w.take(p + "lora_B", (n_out, r))
    magnitude = w.take(p + "m.weight", (n_out, 1)).reshape(-1) if config.get("use_dora") else None
    return LoRA(
        A=A.contiguous(),
        B=B.contiguous(),
        scale=alpha / r,  # replaced by the gate when gated
        gate_weight=w.take_if(gate, p + "gate.weight", (1, n_in)),
        gate_bias=w.take_if(gate, p + "gate.bias", (1,)),
        magnitude=magnitude,
    )


def _fused_qkv_effect(config: Mapping, w: Weights, p: str, H: int, matrices: list[str]) -> LinearEffect:
    """GPT-2's fused c_attn (LoRAMergedLinear): k selected matrices in canonical q,k,v order, A
    [k*r, H] and B [k*H, r] block-diagonal. Expanded to one dense LoRA on the 3H output whose
    unselected blocks are zero; the IA3 vector is padded with 1 and then *all* of it is scaled by
    alpha (the library's quirk, §3.6)."""
    method = _lora_method(config)
    if method not in ("lora", "ia3"):
        raise AdapterUnsupported(f"{method} on GPT-2's fused attn.c_attn: the library cannot run it there "
                                 "(its merged q/k/v layer only knows plain LoRA and IA3); adapt the MLP instead")
    r, alpha, k = config["r"], config["alpha"], len(matrices)
    blocks = ["qkv".index(m) for m in matrices]  # output block of the g-th selected matrix
    if config.get("composition_mode") == "scale":
        b = w.take(p + "lora_B", (k * H, 1)).reshape(k, H)
        vector = torch.ones(3, H)
        vector[blocks] = b
        return Scale(alpha * vector.reshape(-1))
    A = w.take(p + "lora_A", (k * r, H))  # [k*r, H]
    B_groups = w.take(p + "lora_B", (k * H, r)).reshape(k, H, r)
    B = torch.zeros(3, H, k * r)  # [3H, k*r] block-diagonal: block t_g reads A's g-th group only
    for g, t in enumerate(blocks):
        B[t, :, g * r:(g + 1) * r] = B_groups[g]
    gate_w = gate_b = None
    if config.get("use_gating"):  # one gate per selected matrix -> one per output block
        gw, gb = w.take(p + "gate.weight", (k, H)), w.take(p + "gate.bias", (k,))
        gate_w, gate_b = torch.zeros(3, H), torch.zeros(3)
        gate_w[blocks], gate_b[blocks] = gw, gb
    return LoRA(A=A, B=B.reshape(3 * H, k * r), scale=alpha / r, gate_weight=gate_w, gate_bias=gate_b)


def read_lora(config: Mapping, w: Weights, info: ModelInfo) -> Part:
    for key in ("r", "alpha"):
        if isinstance(config.get(key), bool) or not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise AdapterFormatError(f"LoRA {key} must be a positive number, got {config.get(key)!r}")
    _check_lora_options(config, info)
    modules = LORA_MODULES[info.family]
    matrices = [m for m in "qkv" if m in (config.get("attn_matrices") or [])]  # canonical order; "o" ignored
    part = Part(_lora_method(config))
    for layer in _layers(config, info):
        sites = []
        if config.get("selfattn_lora", True) and matrices:
            if info.family == "gpt2":
                p = f"{layer}.attn.c_attn.loras."
                part.linear[(layer, "attn.c_attn")] = _fused_qkv_effect(config, w, p, info.hidden_size, matrices)
            else:
                sites += [modules[m] for m in matrices]
        sites += [modules[loc] for loc in ("intermediate", "output") if config.get(f"{loc}_lora")]
        for module in sites:
            n_in, n_out = info.linear_shapes[module]
            part.linear[(layer, module)] = _lora_effect(config, w, f"{layer}.{module}.loras.", n_in, n_out)
    return part


# ---- prefix tuning (§3.4)


def read_prefix(config: Mapping, w: Weights, info: ModelInfo) -> Part:
    """The prefix as flat per-layer K/V. The MLP (if any) is evaluated once, here; a 1-D
    `control_trans` is flat whatever `flat` says (ejected prefixes keep `flat: false`)."""
    if config.get("use_gating"):
        raise AdapterUnsupported(
            "prefix tuning with use_gating (UniPELT's prefix gate) is not supported: the gate depends on "
            "each chunk's tokens, so the prefix cannot be written once into the KV cache"
        )
    H, nh, nkv = info.hidden_size, info.num_heads, info.num_kv_heads
    hd = H // nh  # the library sizes prefixes by H/nh, ignoring an explicit head_dim
    if hd != info.head_dim:
        raise AdapterIncompatible(f"prefix head size H/nh = {hd} differs from the model's head_dim {info.head_dim}")
    L = config.get("prefix_length")
    if isinstance(L, bool) or not isinstance(L, int) or L <= 0:
        raise AdapterFormatError(f"prefix_length must be a positive integer, got {L!r}")
    layers = _layers(config, info)
    width = len(layers) * 2 * nkv * hd
    p = "prefix_tuning.prefix_tunings.self_prefix."
    flat = w.has(p + "control_trans") and w.tensors[p + "control_trans"].dim() == 1
    if flat:
        Z = w.take(p + "control_trans", (L * width,)).view(L, width)
    else:
        first = p + "control_trans.0.weight"
        bs = w.tensors[first].shape[0] if w.has(first) else config.get("bottleneck_size", 512)  # MLP width
        E = w.take(p + "wte.weight", (L, H))  # the prefix's own embedding table
        hidden = F.linear(E, w.take(p + "control_trans.0.weight", (bs, H)), w.take(p + "control_trans.0.bias", (bs,)))
        act = activation(_activation_name(config.get("non_linearity", "tanh")))
        Z = F.linear(act(hidden), w.take(p + "control_trans.2.weight", (width, bs)), w.take(p + "control_trans.2.bias", (width,)))
    Z = Z.reshape(L, len(layers) * 2, nkv, hd).permute(1, 2, 0, 3)  # [2*n_pl, nkv, L, hd]
    keys = {layer: Z[2 * j].contiguous() for j, layer in enumerate(layers)}  # slot 2j: keys of the j-th prefix layer
    values = {layer: Z[2 * j + 1].contiguous() for j, layer in enumerate(layers)}
    return Part("prefix_tuning", prefix=Prefix(keys=keys, values=values, length=L, shifts_positions=False))


# ----------------------------------------------------------------------------- the directory


def _prompt_tuning(config, w, info) -> Part:
    raise AdapterUnsupported(
        "prompt tuning (architecture 'prompt_tuning') cannot be used with GPT-2 or Llama: adapters 1.3.0 rejects "
        "it for these models, so such a file cannot come from them"
    )


READERS = {None: read_bottleneck, "bottleneck": read_bottleneck, "lora": read_lora, "mtl_lora": read_lora,
           "prefix_tuning": read_prefix, "prompt_tuning": _prompt_tuning}


def _read_parts(config: Mapping, w: Weights, info: ModelInfo) -> list[Part]:
    if not isinstance(config, Mapping):
        raise AdapterFormatError("adapter_config.json `config` must be an object")
    arch = config.get("architecture")
    if arch == "union":
        configs = config.get("configs")
        if not isinstance(configs, list) or not configs:
            raise AdapterFormatError("a union config needs a non-empty `configs` list")
        return [p for c in configs for p in _read_parts(c, w, info)]
    if arch not in READERS:
        raise AdapterUnsupported(f"unknown adapter architecture {arch!r}; supported: bottleneck, lora (incl. IA3, VeRA, "
                                 "DoRA), mtl_lora, prefix_tuning, union")
    return [READERS[arch](config, w, info)]


def _merge(parts: list[Part]) -> Part:
    merged = Part(parts[0].method if len(parts) == 1 else "union")
    for part in parts:
        for table in ("linear", "bottleneck"):
            mine, theirs = getattr(merged, table), getattr(part, table)
            if clash := mine.keys() & theirs.keys():
                raise AdapterUnsupported(f"two parts of the union act on the same {table} site {sorted(clash)[0]}")
            mine.update(theirs)
        for single in ("invertible", "prefix"):
            if getattr(part, single) is not None:
                if getattr(merged, single) is not None:
                    raise AdapterUnsupported(f"a union may hold only one {single} part")
                setattr(merged, single, getattr(part, single))
    return merged


def _fix_legacy_config(meta: dict) -> dict:
    """The loader-side fixes of the library (§1.2), on a copy."""
    config = dict(meta["config"])
    if "version" not in meta and config.get("non_linearity") in LEGACY_ACTIVATIONS:
        config["non_linearity"] = LEGACY_ACTIVATIONS[config["non_linearity"]]
    if isinstance(config.get("invertible_adapter"), Mapping):  # adapter-transformers v1 nesting
        nested = config.pop("invertible_adapter")
        config["inv_adapter"] = nested.get("block_type")
        config["inv_adapter_reduction_factor"] = nested.get("reduction_factor")
    version = str(meta.get("version", ""))
    if version.startswith("adapters.") and config.get("architecture") == "lora" and config.get("r") != config.get("alpha"):
        try:
            old = Version(version[len("adapters."):]) < Version("1.1.0")
        except InvalidVersion:
            old = False
        if old:  # LoRA trained with the faulty scaling of adapters < 1.1.0 ran with alpha = r
            config["alpha"] = config["r"]
    return config


def _check_model(meta: Mapping, info: ModelInfo) -> None:
    model_type = meta.get("model_type")
    if model_type is not None and model_type != info.model_type:
        raise AdapterIncompatible(f"adapter was trained for model_type {model_type!r}, the base model is {info.model_type!r}")
    hidden = meta.get("hidden_size")
    if hidden is not None and hidden != info.hidden_size:
        raise AdapterIncompatible(f"adapter hidden_size is {hidden}, the base model's is {info.hidden_size}")


def read_adapterhub(directory: Path, info: ModelInfo, name: str | None = None) -> Adapter:
    """A `save_adapter()` directory -> `Adapter`, every tensor checked against `info`."""
    directory = Path(directory)
    meta = read_json(directory / "adapter_config.json")
    if not isinstance(meta.get("config"), Mapping):
        raise AdapterFormatError("adapter_config.json has no `config` object")
    _check_model(meta, info)
    if info.family not in LORA_MODULES:
        raise AdapterIncompatible(f"AdapterHub adapters are not supported for model family {info.family!r}")
    config = _fix_legacy_config(meta)
    weights = Weights(read_tensors(directory, WEIGHT_FILES), meta.get("name"), info)
    part = _merge(_read_parts(config, weights, info))
    weights.check_all_used()
    return Adapter(
        name=name or meta.get("name") or directory.name,
        format="adapterhub",
        method=part.method,
        config=meta,
        linear=part.linear,
        bottleneck=part.bottleneck,
        invertible=part.invertible,
        prefix=part.prefix,
        head=read_flex_head(directory, meta, info),
    )


# ----------------------------------------------------------------------------- flex heads (§1.1, §3.3)

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
            layers.append(("act", _activation_name(config["activation_function"])))
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


# ----------------------------------------------------------------------------- stacks (§7.2)


def validate_stack(setup: Sequence[Adapter]) -> None:
    """Refuse (InvalidRequest) a Stack whose meaning the runtime does not reproduce.

    Supported: any Stack of AdapterHub bottleneck / LoRA / IA3 / prefix / invertible adapters
    composed as in §7.2 (bottlenecks chain per location, the first adapter's NICE only, prefixes
    concatenate, linear effects apply in order), e.g. MAD-X Stack(lang SeqBnInv, task SeqBn).
    Refused: PEFT adapters or prompts in a Stack, LoRA/IA3 on GPT-2's fused c_attn in a Stack
    (the library raises there), a LoRA that would read an earlier adapter's output at a
    linear whose in != out (the library fails with a shape error), and a DoRA sharing a linear
    with another adapter of the stack."""
    if len(setup) <= 1:
        return
    for a in setup:
        if a.format != "adapterhub":
            raise InvalidRequest(f"adapter {a.name!r} ({a.format}) cannot be stacked: only AdapterHub adapters compose")
        if a.prompt is not None:
            raise InvalidRequest(f"prompt-tuning adapter {a.name!r} cannot be stacked")
        if any(module == "attn.c_attn" for _, module in a.linear):
            raise InvalidRequest(
                f"adapter {a.name!r} has LoRA/IA3 on GPT-2's fused attn.c_attn, which AdapterHub cannot stack"
            )
    sites = {site for a in setup for site in a.linear}
    for site in sites:
        effects = [(a.name, e) for a in setup if (e := a.linear.get(site)) is not None]
        dora = next((name for name, e in effects if isinstance(e, LoRA) and e.magnitude is not None), None)
        if dora is not None and len(effects) > 1:
            raise InvalidRequest(
                f"DoRA adapter {dora!r} shares layer {site[0]} {site[1]} with another adapter of the stack: the library "
                "renormalizes the composed delta by the last adapter's norm there, which this server does not compute")
        for name, e in effects[1:]:
            if isinstance(e, LoRA) and e.A.shape[1] != e.B.shape[0]:
                raise InvalidRequest(
                    f"LoRA {name!r} follows another adapter at layer {site[0]} {site[1]}, whose input and output "
                    f"sizes differ ({e.A.shape[1]} != {e.B.shape[0]}): a stacked LoRA reads the previous output"
                )


# ----------------------------------------------------------------------------- store form


def eject_prefix(config: dict, tensors: dict[str, Tensor], prefix: Prefix | None) -> tuple[dict, dict[str, Tensor]]:
    """The saved files with a prefix in the form the store keeps: the flat K/V that `prefix`
    (this reader's result) holds, as a 1-D `control_trans`, and a config saying `flat: true`
    — the library's own flat format, so `adapters` loads it back (its `eject_prefix_tuning`
    keeps `flat: false` and crashes on grouped-query models; reference §3.4).
    Z[p, 2j + kv, head, d] is the j-th prefix layer's key (kv=0) or value (kv=1)."""
    parts = config["config"]["configs"] if config["config"].get("architecture") == "union" else [config["config"]]
    part = next((c for c in parts if c.get("architecture") == "prefix_tuning"), None)
    if part is None or prefix is None:
        return config, tensors
    canonical = [k for k in tensors if "prefix_tuning.prefix_tunings." in k and ".self_prefix." in k
                 and ".prefix_tuning.pool." not in k]
    base = canonical[0].split("self_prefix.")[0] + "self_prefix."
    layers = sorted(prefix.keys)
    Z = torch.stack([t for layer in layers for t in (prefix.keys[layer], prefix.values[layer])])  # [2 n_pl, nkv, L, hd]
    flat = Z.permute(2, 0, 1, 3).reshape(-1).contiguous()  # [L * 2 n_pl * nkv * hd]
    kept = {k: v for k, v in tensors.items() if not (k.startswith(base) or ".prefix_tuning.pool." in k)}
    kept[base + "control_trans"] = flat
    part["flat"] = True
    return config, kept
