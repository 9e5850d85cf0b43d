"""Linear-site math: LoRA deltas and (IA)^3 scales, alone or stacked.

Reference loop for one linear y = base(x) with the adapters e_1..e_n of a Stack present there
(AdapterHub reference §7.2.3; a single adapter is the n = 1 case, which is also PEFT's):
    v = None
    for e in effects:
        LoRA: v = e.scale * ((x if v is None else v) @ A.T) @ B.T
        IA3:  v = e.vector if v is None else v * e.vector
    y = y + v if the last effect is a LoRA else y * v
PEFT's feed-forward (IA)^3 scales the *input* instead: y = base(x * vector) (`scale_input`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..adapters import LoRA, LinearEffect, Scale


def token_mean(values: Tensor, token_mask: Tensor | None) -> Tensor:
    """Mean over the sequence axis of [n, S, k], counting valid tokens only -> [n, 1, k]."""
    if token_mask is None:
        return values.mean(dim=1, keepdim=True)
    return (values * token_mask).sum(dim=1, keepdim=True) / token_mask.sum(dim=1, keepdim=True).clamp_min(1)


def lora_scale(lora: LoRA, x: Tensor, token_mask: Tensor | None) -> Tensor | float:
    """alpha/r, or for gated LoRA the per-row, per-output-block gate (broadcast to [n, 1, out])."""
    if lora.gate_weight is None:
        return lora.scale
    gate = token_mean(torch.sigmoid(x @ lora.gate_weight.T + lora.gate_bias), token_mask)  # [n, 1, blocks]
    out = lora.B.shape[0]
    return gate.repeat_interleave(out // gate.shape[-1], dim=-1)  # [n, 1, out]


def lora_delta(lora: LoRA, z: Tensor, x: Tensor, token_mask: Tensor | None) -> Tensor:
    """scale * ((z @ A.T) @ B.T + bias); z is the LoRA input, x the layer input (for the gate)."""
    delta = (z @ lora.A.T) @ lora.B.T
    if lora.bias is not None:
        delta = delta + lora.bias
    return delta * lora_scale(lora, x, token_mask)


def scale_input(x: Tensor, effects: Sequence[LinearEffect]) -> Tensor:
    """Apply the input-side (IA)^3 vectors (PEFT feed-forward modules): x * l."""
    for e in effects:
        if isinstance(e, Scale) and e.on_input:
            x = x * e.vector
    return x


def apply_output(x: Tensor, y: Tensor, effects: Sequence[LinearEffect], token_mask: Tensor | None) -> Tensor:
    """y = base(x) with the output-side effects applied (see the module docstring)."""
    running: Tensor | None = None
    last_is_lora = False
    for e in effects:
        if isinstance(e, LoRA):
            running = lora_delta(e, x if running is None else running, x, token_mask)
            last_is_lora = True
        elif not e.on_input:
            running = e.vector if running is None else running * e.vector
            last_is_lora = False
    if running is None:
        return y
    return y + running if last_is_lora else y * running


# --------------------------------------------------------------------------- gathered path
# Many distinct LoRAs at one linear: instead of a loop over adapters, stack one A and one B
# per row (ranks zero-padded to the largest, scale folded into B) and use two batched
# matmuls. Same result as lora_delta row by row (the zero padding adds exact zeros).


def is_plain_lora(e: LinearEffect) -> bool:
    return isinstance(e, LoRA) and e.gate_weight is None and e.bias is None and e.magnitude is None


def per_row(stacked: Tensor, rows_per_group: Sequence[int]) -> Tensor:
    """[groups, ...] -> [rows, ...]: each group's entry repeated for its rows (one gather)."""
    counts = torch.tensor(list(rows_per_group), device=stacked.device)
    return stacked[torch.repeat_interleave(torch.arange(len(counts), device=stacked.device), counts)]


def stack_loras(loras: Sequence[LoRA], rows_per_lora: Sequence[int]) -> tuple[Tensor, Tensor]:
    """-> A [n_rows, r_max, in], B [n_rows, out, r_max] with B scaled; row order = loras order.
    A handful of ops whatever the number of adapters: rebuilt whenever the batch changes."""
    r_max = max(l.A.shape[0] for l in loras)
    pad = lambda t, spec: F.pad(t, spec) if any(spec) else t  # noqa: E731  (most ranks are equal: no copy)
    A = torch.stack([pad(l.A, (0, 0, 0, r_max - l.A.shape[0])) for l in loras])  # [g, r_max, in]
    B = torch.stack([pad(l.B, (0, r_max - l.B.shape[1])) for l in loras])  # [g, out, r_max]
    scales = torch.tensor([l.scale for l in loras], dtype=B.dtype, device=B.device)
    return per_row(A, rows_per_lora), per_row(B * scales[:, None, None], rows_per_lora)


def gathered_lora_delta(x: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """x [n, S, in], A [n, r, in], B [n, out, r] -> [n, S, out]: row i gets B_i A_i x_i."""
    return torch.bmm(torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2))


def gatherable_kind(effects: Sequence[LinearEffect]) -> str | None:
    """Which gathered path can apply this group's effects at one linear: "lora" (a plain LoRA),
    "out" / "in" (an output / input (IA)^3 scale), or None (a stack: apply it alone)."""
    if len(effects) != 1:
        return None
    e = effects[0]
    if isinstance(e, Scale):
        return "in" if e.on_input else "out"
    return "lora" if is_plain_lora(e) else None


def stack_scales(scales: Sequence[Scale], rows_per_scale: Sequence[int]) -> Tensor:
    """-> [n_rows, 1, dim]: each group's vector once per row, to multiply [n_rows, S, dim]."""
    return per_row(torch.stack([s.vector for s in scales])[:, None, :], rows_per_scale)


# --------------------------------------------------------------------------- DoRA
# PEFT DoRA (reference peft §2.6): the norm of each output row of W + s B A is taken from the
# base weight, so it is computed where the base linear is known (the batch memoizes it).


def dora_ratio(lora: LoRA, weight: Tensor) -> Tensor:
    """m / ||W + s B A||_row -> [out], from the base weight [out, in]."""
    V = weight.float() + lora.scale * (lora.B.float() @ lora.A.float())
    return (lora.magnitude.float() / V.norm(dim=1)).to(weight.dtype)


def dora_output(x: Tensor, y: Tensor, lora: LoRA, ratio: Tensor, base_bias: Tensor | None) -> Tensor:
    """y = base(x) (bias b included) -> ratio * (y - b + s (x A.T) B.T) + b."""
    y_nobias = y - base_bias if base_bias is not None else y
    out = ratio * (y_nobias + lora_delta(lora, x, x, None))
    return out + base_bias if base_bias is not None else out
