"""Flex causal-LM heads of AdapterHub `*AdapterModel` adapters: the layers before the tied
vocabulary projection (Linear, activation, LayerNorm, as `CausalLMHead.build` stacks them).
Rows with a head take the side path (batch.py).

Reference for one row: z = layers(ln_f(h)); z = NICE^-1(z) if the setup's first adapter is
invertible; logits = z @ E.T + bias."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..adapters import LMHead
from .bottleneck import activation


def transform(head: LMHead, h: Tensor) -> Tensor:
    """[n, H] -> [n, E]: the head's layers in order."""
    for layer in head.layers:
        kind = layer[0]
        if kind == "linear":
            h = F.linear(h, layer[1], layer[2])
        elif kind == "act":
            h = activation(layer[1])(h)
        else:  # "ln"
            h = F.layer_norm(h, (h.shape[-1],), layer[1], layer[2], layer[3])
    return h
