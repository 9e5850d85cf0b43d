"""Exact low-rank (LoRA) forms of weight-delta methods, computed once when an adapter is read.

Every method here adds x @ dW.T to a linear's output, with a dW [out, in] that is a product of
small factors. Rewriting dW as B @ A (B [out, k], A [k, in]) lets the runtime serve it on the
LoRA path unchanged (per row, gathered, merged). Each function's docstring states dW as the
library computes it; the factorizations are identities, not approximations.

A rank k above min(out, in) would cost more than the dense delta itself, so `low_rank` then
falls back to the dense form: dW as one factor and the identity as the other (rank min(out, in)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..adapters import LoRA


def dense(delta: Tensor, scale: float) -> LoRA:
    """dW = scale * delta [out, in] as a LoRA of rank min(out, in): one factor is the identity."""
    out, fan_in = delta.shape
    if out <= fan_in:  # B = I [out, out], A = delta
        return LoRA(A=delta.contiguous(), B=torch.eye(out, dtype=delta.dtype), scale=scale)
    return LoRA(A=torch.eye(fan_in, dtype=delta.dtype), B=delta.contiguous(), scale=scale)


def low_rank(B: Tensor, A: Tensor, scale: float) -> LoRA:
    """dW = scale * B @ A; dense when the rank k is above min(out, in)."""
    if A.shape[0] > min(B.shape[0], A.shape[1]):
        return dense(B @ A, scale)
    return LoRA(A=A.contiguous(), B=B.contiguous(), scale=scale)


def hadamard(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, scale: float) -> LoRA:
    """LoHa: dW = scale * (w1a @ w1b) * (w2a @ w2b)   (elementwise), w?a [out, r?], w?b [r?, in].

    dW[o, i] = sum_{j,k} (w1a[o, j] w2a[o, k]) (w1b[j, i] w2b[k, i]): a rank r1*r2 product of
    the row-wise Kronecker product of w1a and w2a (B) and the column-wise one of w1b and w2b (A)."""
    out, fan_in = w1a.shape[0], w1b.shape[1]
    B = (w1a[:, :, None] * w2a[:, None, :]).reshape(out, -1)  # [out, r1*r2]
    A = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, fan_in)  # [r1*r2, in]
    return low_rank(B, A, scale)


def _factors(full: Tensor | None, a: Tensor | None, b: Tensor | None) -> tuple[Tensor, Tensor]:
    """(P, Q) with P @ Q = the Kronecker factor: its low-rank pair, or the full matrix next to
    an identity on its shorter side."""
    if full is None:
        return a, b
    rows, cols = full.shape
    if rows <= cols:
        return torch.eye(rows, dtype=full.dtype), full
    return full, torch.eye(cols, dtype=full.dtype)


def kronecker(w1: tuple, w2: tuple, scale: float) -> LoRA:
    """LoKr: dW = scale * kron(W1, W2), W1 [a1, b1], W2 [a2, b2], out = a1*a2, in = b1*b2.
    Each factor is given as (full, a, b): its full matrix, or (None, a, b) with W = a @ b.

    With W = P @ Q for both factors, kron(P1 Q1, P2 Q2) = kron(P1, P2) @ kron(Q1, Q2) (the
    mixed-product rule): a LoRA of rank k1*k2, where k is a factor's rank (r for a low-rank
    factor, its shorter side for a full one)."""
    P1, Q1 = _factors(*w1)
    P2, Q2 = _factors(*w2)
    return low_rank(torch.kron(P1, P2), torch.kron(Q1, Q2), scale)
