"""LoRA-family AdapterHub adapters (LoRAConfig and what the library builds from it: IA3 with
composition_mode "scale", VeRA, DoRA, DvoRA, MTL-LoRA): a `LoRA` or `Scale` per (layer,
module). Reference §3.5, §3.6, §8."""

from __future__ import annotations

from typing import Mapping

import torch

from ...adapters import LinearEffect, LoRA, Scale
from ...errors import AdapterFormatError, AdapterUnsupported
from ...models.common import ModelInfo
from .keys import Weights
from .parts import Part, layers_of

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
    for layer in layers_of(config, info):
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


