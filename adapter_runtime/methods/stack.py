"""A Stack of adapters at one linear site (AdapterHub reference §7.2.3; one adapter is the
n = 1 case, which is also PEFT's). Used by the side path for stacks and for the effect that
undoes a merged adapter; single banked adapters never come here.

Reference loop for y = base(x) with the effects e_1..e_n present at the site:
    v = None
    for e in effects:
        LoRA: v = e.scale * ((x if v is None else v) @ A.T) @ B.T
        IA3:  v = e.vector if v is None else v * e.vector
    y = y + v if the last effect is a LoRA else y * v
PEFT's feed-forward (IA)^3 scales the *input* instead: y = base(x * vector) (`scale_input`).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ..adapters import LinearEffect, LoRA, Scale
from .lora import lora_delta


def scale_input(x: Tensor, effects: Sequence[LinearEffect]) -> Tensor:
    """Apply the input-side (IA)^3 vectors: x * l."""
    for e in effects:
        if isinstance(e, Scale) and e.on_input:
            x = x * e.vector
    return x


def apply_output(x: Tensor, y: Tensor, effects: Sequence[LinearEffect], segments: Tensor | None) -> Tensor:
    """y = base(x) with the output-side effects applied (see the module docstring)."""
    running: Tensor | None = None
    last_is_lora = False
    for e in effects:
        if isinstance(e, LoRA):
            running = lora_delta(e, x if running is None else running, x, segments)
            last_is_lora = True
        elif not e.on_input:
            running = e.vector if running is None else running * e.vector
            last_is_lora = False
    if running is None:
        return y
    return y + running if last_is_lora else y * running
