"""Folding a linear effect into base weights, and the effect that undoes it per row.

Weights are nn.Linear [out, in] (GPT-2's Conv1D weights are transposed at load, so a Conv1D
merge `W_c += s (B A)^T` is the same `W += s B A` here).

    LoRA             W' = W + s B A            b' = b + s b_B (lora_bias)
    DoRA (PEFT)      W' = diag(m / ||W + s B A||_row) (W + s B A)    b' = b (the bias stays
                                                               outside the rescale, as in
                                                               PEFT's forward and merge)
    IA3 on output    W' = l[:, None] * W       b' = l * b     (the unmerged forward scales
                                                               the bias; AdapterHub's merge
                                                               forgets it, we do not)
    IA3 on input     W' = W * l[None, :]       b' = b

While an adapter is merged, rows that do not use it get `inverse(effect)` applied to the
merged output: a LoRA with -s, or the reciprocal scale. DoRA's rescale has no low-rank
inverse, so its rows get `dense_undo`: the exact difference W - W' of the stored tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..adapters import LinearEffect, LoRA, Scale
from ..errors import AdapterConflict

MIN_ABS_SCALE = 1e-6  # a merged IA3 vector must be invertible for the other rows


def check_mergeable(effect: LinearEffect, site: str) -> None:
    if isinstance(effect, LoRA) and effect.gate_weight is not None:
        raise AdapterConflict(f"gated LoRA at {site} cannot be merged: its scale depends on each request's tokens")
    if isinstance(effect, Scale) and bool((effect.vector.abs() < MIN_ABS_SCALE).any()):
        raise AdapterConflict(f"(IA)^3 vector at {site} has (near-)zero entries: a merge could not be undone exactly for other requests")


def merged_weights(effect: LinearEffect, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(W', b') with the effect folded in; computed in fp32, returned in the weights' dtype."""
    W = weight.float()
    b = bias.float() if bias is not None else None
    if is_dora(effect):
        V = W + effect.scale * (effect.B.float() @ effect.A.float())
        W = (effect.magnitude.float() / V.norm(dim=1))[:, None] * V
    elif isinstance(effect, LoRA):
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
    """The effect that turns the merged layer's output back into the base layer's output
    (DoRA has none of this form: see `dense_undo`)."""
    if is_dora(effect):
        raise ValueError("a merged DoRA is undone with dense_undo, not a low-rank inverse")
    if isinstance(effect, LoRA):
        return LoRA(A=effect.A, B=effect.B, scale=-effect.scale, bias=effect.bias)
    return Scale(vector=torch.reciprocal(effect.vector), on_input=effect.on_input)


def is_dora(effect: LinearEffect) -> bool:
    return isinstance(effect, LoRA) and effect.magnitude is not None


def dense_undo(original: Tensor, merged: Tensor, identities: dict) -> LoRA:
    """The effect that adds x @ (W - W').T: the merged layer's output back to the original's,
    exactly for the tensors stored (rounding of W' included). A LoRA of rank min(out, in) whose
    other factor is the identity; `identities` shares one identity per size and device."""
    out, fan_in = original.shape
    difference = (original.float() - merged.float()).to(original.dtype)  # [out, in]
    size = min(out, fan_in)
    key = (size, original.dtype, original.device)
    if key not in identities:
        identities[key] = torch.eye(size, dtype=original.dtype, device=original.device)
    if out <= fan_in:
        return LoRA(A=difference, B=identities[key], scale=1.0)
    return LoRA(A=identities[key], B=difference, scale=1.0)
