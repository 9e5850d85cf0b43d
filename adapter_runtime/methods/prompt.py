"""Prompt tuning (PEFT `PromptTuningConfig`, P-tuning after its encoder is evaluated at load):
n soft-prompt vectors take the place of n virtual tokens before the real ones, with positions
0..n-1 like any token; the real tokens follow at n.. and the virtual tokens' logits are dropped.

No bank is needed: the vectors are placed only while the virtual tokens are prefilled.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..adapters import Adapter


def virtual_tokens(setup: Sequence[Adapter]) -> int:
    return sum(a.prompt.length for a in setup if a.prompt is not None)


def vectors(setup: Sequence[Adapter]) -> Tensor | None:
    """[n, H] of the setup's prompt adapter (a setup holds at most one), or None."""
    return next((a.prompt.embeddings for a in setup if a.prompt is not None), None)


def place(h: Tensor, placements: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """h [N, H] with h[tokens] = vectors for each (tokens [k], vectors [k, H]): the embeddings of
    virtual tokens replaced by the soft prompt (reference: h[row, :n] = prompt)."""
    for tokens, v in placements:
        h[tokens] = v.to(h.dtype)
    return h
