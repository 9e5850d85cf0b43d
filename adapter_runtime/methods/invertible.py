"""Invertible language adapters (NICE coupling, MAD-X), AdapterHub reference §3.3.

forward: x = [x1 | x2] with x1 = x[..., :H//2];  y1 = x1 + F(x2);  y2 = x2 + G(y1)
inverse: x2 = y2 - G(y1);  x1 = y1 - F(x2)
F(z) = f2(act(f0(z))), G(z) = g2(act(g0(z))).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..adapters import Invertible
from .bottleneck import activation


def _f(inv: Invertible, z: Tensor) -> Tensor:
    return F.linear(activation(inv.activation)(F.linear(z, inv.f0_weight, inv.f0_bias)), inv.f2_weight, inv.f2_bias)


def _g(inv: Invertible, z: Tensor) -> Tensor:
    return F.linear(activation(inv.activation)(F.linear(z, inv.g0_weight, inv.g0_bias)), inv.g2_weight, inv.g2_bias)


def forward(inv: Invertible, x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    y1 = x1 + _f(inv, x2)
    y2 = x2 + _g(inv, y1)
    return torch.cat([y1, y2], dim=-1)


def inverse(inv: Invertible, y: Tensor) -> Tensor:
    half = y.shape[-1] // 2
    y1, y2 = y[..., :half], y[..., half:]
    x2 = y2 - _g(inv, y1)
    x1 = y1 - _f(inv, x2)
    return torch.cat([x1, x2], dim=-1)
