"""Flex causal-LM heads of AdapterHub `*AdapterModel` adapters: the layers before the tied
vocabulary projection (Linear, activation, LayerNorm, as `CausalLMHead.build` stacks them)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..adapters import LMHead
from .bottleneck import activation


def transform(head: LMHead, h: Tensor) -> Tensor:
    """[n, S, H] -> [n, S, E]: the head's layers in order."""
    for layer in head.layers:
        kind = layer[0]
        if kind == "linear":
            h = F.linear(h, layer[1], layer[2])
        elif kind == "act":
            h = activation(layer[1])(h)
        else:  # "ln"
            h = F.layer_norm(h, (h.shape[-1],), layer[1], layer[2], layer[3])
    return h
