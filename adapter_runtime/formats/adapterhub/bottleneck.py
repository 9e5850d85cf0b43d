"""Bottleneck family of AdapterHub adapters (BnConfig, SeqBn, DoubleSeqBn, ParBn, Compacter*,
*Inv): one `Bottleneck` per (layer, location), plus the `Invertible` (NICE) part of *Inv
configs. Reference §1.3 (module internals), §3.1-§3.3."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from ...adapters import Bottleneck, Invertible
from ...errors import AdapterFormatError, AdapterIncompatible, AdapterUnsupported
from ...methods.bottleneck import phm_weight
from ...models.common import ModelInfo
from .keys import Weights
from .parts import Part, activation_name, layers_of

# bottleneck config flag -> (key container, our location)
BOTTLENECK_LOCATIONS = {"mh_adapter": ("attention_adapters", "attn"), "output_adapter": ("output_adapters", "ffn")}


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
        activation=activation_name(config.get("non_linearity", "relu")),
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
        activation=activation_name(config.get("non_linearity", "relu")),
    )


def read_bottleneck(config: Mapping, w: Weights, info: ModelInfo) -> Part:
    H = info.hidden_size
    part = Part("compacter" if config.get("phm_layer") else "bottleneck")
    for layer in layers_of(config, info):
        for flag, (container, location) in BOTTLENECK_LOCATIONS.items():
            if config.get(flag):
                part.bottleneck[(layer, location)] = _bottleneck(config, w, f"{layer}.{container}.adapters.", layer, H)
    part.invertible = _invertible(config, w, H)
    return part


