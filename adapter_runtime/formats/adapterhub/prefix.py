"""Prefix tuning of AdapterHub adapters (PrefixTuningConfig): the prefix as flat per-layer K/V,
its MLP (if any) evaluated once here. Reference §3.4."""

from __future__ import annotations

from typing import Mapping

import torch.nn.functional as F

from ...adapters import Prefix
from ...errors import AdapterFormatError, AdapterIncompatible, AdapterUnsupported
from ...methods.bottleneck import activation
from ...models.common import ModelInfo
from .keys import Weights
from .parts import Part, activation_name, layers_of


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
    layers = layers_of(config, info)
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
        act = activation(activation_name(config.get("non_linearity", "tanh")))
        Z = F.linear(act(hidden), w.take(p + "control_trans.2.weight", (width, bs)), w.take(p + "control_trans.2.bias", (width,)))
    Z = Z.reshape(L, len(layers) * 2, nkv, hd).permute(1, 2, 0, 3)  # [2*n_pl, nkv, L, hd]
    keys = {layer: Z[2 * j].contiguous() for j, layer in enumerate(layers)}  # slot 2j: keys of the j-th prefix layer
    values = {layer: Z[2 * j + 1].contiguous() for j, layer in enumerate(layers)}
    return Part("prefix_tuning", prefix=Prefix(keys=keys, values=values, length=L, shifts_positions=False))


