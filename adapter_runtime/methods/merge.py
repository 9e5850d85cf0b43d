"""Folding a linear effect into base weights, and the effect that undoes it per row.

Weights are nn.Linear [out, in] (GPT-2's Conv1D weights are transposed at load, so a Conv1D
merge `W_c += s (B A)^T` is the same `W += s B A` here).

    LoRA             W' = W + s B A            b' = b + s b_B (lora_bias)
    IA3 on output    W' = l[:, None] * W       b' = l * b     (the unmerged forward scales
                                                               the bias; AdapterHub's merge
                                                               forgets it, we do not)
    IA3 on input     W' = W * l[None, :]       b' = b

While an adapter is merged, rows that do not use it get `inverse(effect)` applied to the
merged output: a LoRA with -s, or the reciprocal scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..adapters import LinearEffect, LoRA, Scale
from ..errors import AdapterConflict

MIN_ABS_SCALE = 1e-6  # a merged IA3 vector must be invertible for the other rows


def check_mergeable(effect: LinearEffect, site: str) -> None:
    if isinstance(effect, LoRA) and effect.magnitude is not None:
        raise AdapterConflict(f"DoRA at {site} cannot be merged here yet: its per-row norm would have to be "
                              "undone for every other request")
    if isinstance(effect, LoRA) and effect.gate_weight is not None:
        raise AdapterConflict(f"gated LoRA at {site} cannot be merged: its scale depends on each request's tokens")
    if isinstance(effect, Scale) and bool((effect.vector.abs() < MIN_ABS_SCALE).any()):
        raise AdapterConflict(f"(IA)^3 vector at {site} has (near-)zero entries: a merge could not be undone exactly for other requests")


def merged_weights(effect: LinearEffect, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(W', b') with the effect folded in; computed in fp32, returned in the weights' dtype."""
    W = weight.float()
    b = bias.float() if bias is not None else None
    if isinstance(effect, LoRA):
        W = W + effect.scale * (effect.B.float() @ effect.A.float())
        if effect.bias is not None:
            if b is None:
                raise AdapterConflict("LoRA with lora_bias cannot be merged into a linear that has no bias")
            b = b + effect.scale * effect.bias.float()
    elif effect.on_input:
        W = W * effect.vector.float()[None, :]
    else:
        W = W * effect.vector.float()[:, None]
        b = b * effect.vector.float() if b is not None else None
    return W.to(weight.dtype), (b.to(bias.dtype) if b is not None else None)


def inverse(effect: LinearEffect) -> LinearEffect:
    """The effect that turns the merged layer's output back into the base layer's output."""
    if isinstance(effect, LoRA):
        return LoRA(A=effect.A, B=effect.B, scale=-effect.scale, bias=effect.bias)
    return Scale(vector=torch.reciprocal(effect.vector), on_input=effect.on_input)
