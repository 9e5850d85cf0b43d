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


@torch.library.custom_op("adapter_server::stored", mutates_args=())
def _materialize(x: Tensor) -> Tensor:
    return x.clone()


@_materialize.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


def materialized(x: Tensor) -> Tensor:
    """x, computed once. A bank applies each token's own small matrix as a batched
    matrix-vector product, which inductor lowers on the CPU to a multiply-and-sum that inlines
    the vector's producer: an activation (GELU's erf) or a LayerNorm feeding it would be
    recomputed once per output element, 5x the cost of the whole site (profiled). Compiled, x
    is stored to a buffer (see `lower_materialize`); eager: x itself."""
    return _materialize(x) if torch.compiler.is_compiling() else x


def lower_materialize() -> None:
    """Teach inductor `materialized`: store x in a buffer inside the fused kernel. Without
    this lowering the op runs as an opaque call that splits every bank site into three
    kernels and a Python dispatch each (a bottleneck site 70-90 us -> ~40 us in one kernel,
    profiled). Uses inductor's internal `register_lowering` (torch is pinned); if that moves,
    the op keeps working as the opaque call. Call before the first compile (inductor's graph
    cache does not see lowerings: a changed lowering needs a new op name)."""
    try:
        from torch._inductor.lowering import lowerings, register_lowering
    except ImportError:  # pragma: no cover - a torch without this internal API
        return
    op = torch.ops.adapter_server.stored.default
    if op in lowerings:
        return

    @register_lowering(op)
    def _store(x):
        x.realize()
        return x


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
