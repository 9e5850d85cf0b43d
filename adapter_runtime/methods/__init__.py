"""Adapter methods, one file per method: its math as small pure functions (each docstring
states the reference loop), its device *bank* (the weights of every adapter on the device,
one slot each, read per row by slot index), and for token-space methods their KV/position
layout. `banks.py` lists the banked methods; adding a method is one file here plus a line there.

Shared helpers: `token_mean`, the per-row mean over a chunk's tokens that gated adapters use,
and `materialized`, which keeps torch.compile from recomputing a bank's hidden activations.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("adapter_server::materialize", mutates_args=())
def _materialize(x: Tensor) -> Tensor:
    return x.clone()


@_materialize.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


def materialized(x: Tensor) -> Tensor:
    """x, computed once. A bank applies each token's own small matrix as a batched
    matrix-vector product, which inductor lowers on the CPU to a multiply-and-sum that inlines
    the vector's producer: an activation (GELU's erf) or a LayerNorm feeding it would be
    recomputed once per output element, 5x the cost of the whole site (profiled; an opaque op
    makes inductor store the vector). Eager: x itself."""
    return _materialize(x) if torch.compiler.is_compiling() else x


def token_mean(values: Tensor, segments: Tensor | None, num_segments: int | None = None) -> Tensor:
    """values [n, k], segments [n] (the row each token belongs to, 0..num_segments-1) -> [n, k]:
    each token gets the mean of `values` over its row's tokens in this forward.

    Reference loop: for each row b: out[tokens of b] = mean(values[tokens of b], axis=0)."""
    if segments is None:  # one token per row
        return values
    num_segments = num_segments if num_segments is not None else int(segments.max()) + 1
    sums = values.new_zeros(num_segments, values.shape[-1]).index_add_(0, segments, values)
    counts = segments.bincount(minlength=num_segments).clamp_min(1).to(values.dtype)
    return (sums / counts[:, None])[segments]
