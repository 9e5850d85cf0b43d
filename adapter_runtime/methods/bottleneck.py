"""Bottleneck adapters (Pfeiffer, Houlsby, parallel, any BnConfig; Compacter after PHM
materialization) at one residual site, alone or stacked (AdapterHub reference §3.1, §7.2.1).

Reference loop at one location, s = sublayer output, r = residual before the sublayer:
    v = s
    for a in stack:
        parallel:   x = ares = r              (earlier adapters' v is discarded)
        sequential: x = v + r if a.original_ln_before else v
                    ares = v if a.residual_before_ln is True else x
        v = forward(a, x, ares)
    last parallel:   h = v + s (+ r if original_ln_after)
    last sequential: h = v + r if original_ln_after else v
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..adapters import Bottleneck
from .lora import per_row, token_mean

LN_EPS = 1e-5  # adapter LayerNorms are nn.LayerNorm(H) with the default eps, on Llama too


@lru_cache(maxsize=None)
def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The library's activation lookup: transformers' ACT2FN by lower-cased name, and
    "leakyrelu" as F.leaky_relu (slope 0.01)."""
    from transformers.activations import get_activation

    name = name.lower()
    if name == "leakyrelu":
        return F.leaky_relu
    return get_activation(name)


def _layer_norm(x: Tensor, params: tuple[Tensor, Tensor] | None) -> Tensor:
    if params is None:
        return x
    weight, bias = params
    return F.layer_norm(x, (x.shape[-1],), weight, bias, LN_EPS)


def branch(a: Bottleneck, x: Tensor, token_mask: Tensor | None) -> Tensor:
    """u(x) = U(act(D(LN_before(x)))) * scaling * gate(x)   [n, S, H]"""
    z = F.linear(_layer_norm(x, a.ln_before), a.down_weight, a.down_bias)
    up = F.linear(activation(a.activation)(z), a.up_weight, a.up_bias) * a.scaling
    if a.gate is not None:  # gate reads the pre-LN input; mean over the chunk's tokens
        up = up * token_mean(torch.sigmoid(F.linear(x, *a.gate)), token_mask)
    return up


def forward(a: Bottleneck, x: Tensor, ares: Tensor, token_mask: Tensor | None) -> Tensor:
    """One adapter's output before the block's post-processing (§3.1 steps 2-5)."""
    out = branch(a, x, token_mask)
    if a.is_parallel:
        return _layer_norm(out, a.ln_after)
    if a.adapter_residual_before_ln:
        out = out + ares
    out = _layer_norm(out, a.ln_after)
    if not a.adapter_residual_before_ln:
        out = out + ares
    return out


def compose(stack: Sequence[Bottleneck], s: Tensor, r: Tensor, token_mask: Tensor | None) -> Tensor:
    """The block's hidden state after the location: see the module docstring."""
    v = s
    for a in stack:
        if a.is_parallel:
            x, ares = r, r
        else:
            x = v + r if a.original_ln_before else v
            ares = v if a.residual_before_ln is True else x
        v = forward(a, x, ares, token_mask)
    last = stack[-1]
    if last.is_parallel:
        return v + s + r if last.original_ln_after else v + s
    return v + r if last.original_ln_after else v


def phm_weight(rule: Tensor, W: Tensor) -> Tensor:
    """Compacter's PHM matrix sum_i kron(rule[i], W[i]) -> [in, out] (used as x @ H, no transpose).

    rule [n, n, n], W [n, in/n, out/n]."""
    return sum(torch.kron(rule[i], W[i]) for i in range(rule.shape[0]))


# --------------------------------------------------------------------------- gathered path
# Many groups with one plain sequential adapter at a site (Pfeiffer, Houlsby, Compacter after
# materialization): stack their weights per row, bottleneck widths zero-padded to the widest
# (act(0) = 0 for every activation used here, and the padded up-columns are zero, so the
# padding adds exact zeros), and run two batched matmuls. The per-row flags are 0/1 floats,
# so `s + 0 * r` and `1 * s + 0 * x` reproduce the branchy reference exactly.


class StackedSequential(NamedTuple):
    down: Tensor  # [n, d, H]
    down_bias: Tensor  # [n, 1, d]
    up: Tensor  # [n, H, d]
    up_bias: Tensor  # [n, 1, H]
    scaling: Tensor  # [n, 1, 1]
    add_r_before: Tensor  # [n, 1, 1] original_ln_before
    residual_is_s: Tensor  # [n, 1, 1] residual_before_ln is True
    add_r_after: Tensor  # [n, 1, 1] original_ln_after


def is_plain_sequential(a: Bottleneck) -> bool:
    return (not a.is_parallel and a.ln_before is None and a.ln_after is None and a.gate is None
            and isinstance(a.scaling, float) and activation(a.activation)(torch.zeros(1)).item() == 0.0)


def stack_sequential(adapters: Sequence[Bottleneck], rows_per_adapter: Sequence[int]) -> StackedSequential:
    d_max = max(a.down_weight.shape[0] for a in adapters)
    like = adapters[0].down_weight

    def stacked(tensors) -> Tensor:  # [groups, ...] -> [rows, ...]
        return per_row(torch.stack(list(tensors)), rows_per_adapter)

    def flags(values) -> Tensor:  # one float per adapter -> [rows, 1, 1]
        return stacked(like.new_tensor([float(v) for v in values])[:, None, None])

    return StackedSequential(
        down=stacked(F.pad(a.down_weight, (0, 0, 0, d_max - a.down_weight.shape[0])) for a in adapters),
        down_bias=stacked(F.pad(a.down_bias if a.down_bias is not None else like.new_zeros(a.down_weight.shape[0]),
                                (0, d_max - a.down_weight.shape[0]))[None] for a in adapters),
        up=stacked(F.pad(a.up_weight, (0, d_max - a.up_weight.shape[1])) for a in adapters),
        up_bias=stacked((a.up_bias if a.up_bias is not None else like.new_zeros(a.up_weight.shape[0]))[None]
                        for a in adapters),
        scaling=flags(a.scaling for a in adapters),
        add_r_before=flags(a.original_ln_before for a in adapters),
        residual_is_s=flags(a.residual_before_ln is True for a in adapters),
        add_r_after=flags(a.original_ln_after for a in adapters),
    )


def gathered_sequential(w: StackedSequential, activation_name: str, s: Tensor, r: Tensor) -> Tensor:
    """compose([a_i], s_i, r_i) for every row i at once; s, r [n, S, H] -> h [n, S, H]."""
    x = s + w.add_r_before * r
    ares = w.residual_is_s * s + (1 - w.residual_is_s) * x
    z = activation(activation_name)(torch.baddbmm(w.down_bias, x, w.down.transpose(1, 2)))
    up = torch.baddbmm(w.up_bias, z, w.up.transpose(1, 2)) * w.scaling
    return up + ares + w.add_r_after * r
