"""ReFT interventions (adapters 1.3.0 LoReFT / NoReFT / DiReFT, reference §8) on the hidden
state after a whole decoder layer, at chosen token positions of each row.

The library's forward over a sequence of L tokens (its uncached forward, whose semantics the
server copies; its cached `generate()` intervenes on every new token and crashes with suffix
positions) does, after each layer in `layers`, with h the layer's output [L, H]:
    P = min(prefix_positions, L);  S = min(suffix_positions, L)
    pre = unit_p(h[0:P]);  suf = unit_s(h[L-S:L])          (tied: one unit on both)
    h[0:P] = pre                                            (scatter, prefix first)
    h[L-S+j] = cat(pre, suf)[max(P + S - suffix_positions, 0) + j]   for j < S
The last line is the library's slice `adapted[:, -suffix_positions:]`: while L >= suffix_positions
it is simply h[L-S:L] = suf; on shorter sequences with prefix positions it reads the wrong rows
(requests that would reach that case are refused, composition.check_reft_prompt).

So position i of a row of length L is intervened by the prefix unit iff i < prefix_positions
and by the suffix unit (which wins where both apply) iff i >= L - suffix_positions. The prefix
rule does not depend on L: positions keep their state as the sequence grows, and generated
tokens at positions below prefix_positions are intervened too. The suffix window moves with
every generated token; the engine re-runs a row's last suffix_positions + 1 tokens at each
decode step (layout.RowLayout.recompute) so that the cache holds the unintervened states of
the tokens that left the window, exactly as a full recompute sees them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..adapters import Reft, ReftUnit
from .bottleneck import activation


def unit_forward(unit: ReftUnit, x: Tensor) -> Tensor:
    """x [n, H] -> x + (act(x Ws^T + bs) - x P^T) P   (no subtraction for DiReFT as saved)."""
    source = F.linear(x, unit.source_weight, unit.source_bias)  # [n, r]
    if unit.activation is not None:
        source = activation(unit.activation)(source)
    if unit.subtract_projection:
        source = source - F.linear(x, unit.projection)
    return x + source @ unit.projection


def orthogonal_weight(original: Tensor, base: Tensor) -> Tensor:
    """The weight torch's `parametrizations.orthogonal` (default map, use_trivialization=True)
    computes from its saved state `original` [r, H] and `base` [n, n], n = max(r, H):
    matrix_exp for a square weight, else Householder reflections of the tall form, whose
    column signs are the *integer part* of the stored diagonal (torch casts it with .int(),
    so a trained or randomized diagonal of magnitude < 1 zeroes its column)."""
    X = original.double()
    transposed = X.shape[0] < X.shape[1]
    if transposed:
        X = X.mT
    n, k = X.shape
    if n == k:
        A = X.tril()
        Q = torch.matrix_exp(A - A.mT)
    else:
        A = X.tril(diagonal=-1)
        tau = 2.0 / (1.0 + (A * A).sum(dim=-2))
        Q = torch.linalg.householder_product(A, tau)
        Q = Q * X.diagonal().int().unsqueeze(-2)
    Q = base.double() @ Q
    return (Q.mT if transposed else Q).to(original.dtype).contiguous()


def intervene(reft: Reft, layer: int, h: Tensor, positions: Tensor, lengths: Tensor) -> Tensor:
    """h [n, H] after `layer` for tokens at `positions` [n] of rows whose current lengths are
    `lengths` [n] (per token: its row's L) -> h with the module docstring's interventions."""
    units = reft.units.get(layer)
    if units is None:
        return h
    pre_unit, suf_unit = (units[0], units[0]) if reft.tied else units
    out = h
    if reft.prefix_positions:
        mask = positions < reft.prefix_positions
        if bool(mask.any()):
            out = torch.where(mask[:, None], unit_forward(pre_unit, h), out)
    if reft.suffix_positions:
        mask = positions >= lengths - reft.suffix_positions
        if bool(mask.any()):
            out = torch.where(mask[:, None], unit_forward(suf_unit, h), out)
    return out


def window(setup) -> int:
    """Tokens before the newest that a decode step of this row re-runs: the suffix positions of
    the ReFT that runs (the setup's first leaf's), else 0."""
    block = getattr(setup, "block", None)
    first = block.first() if block is not None else (setup[0] if setup else None)
    reft = first.reft if first is not None else None
    return reft.suffix_positions if reft is not None else 0
