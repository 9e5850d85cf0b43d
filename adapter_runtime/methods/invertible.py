"""Invertible language adapters (NICE coupling, MAD-X), AdapterHub reference §3.3, on the
embedding output (and, through a flex LM head, inverted before the vocabulary projection).

forward: x = [x1 | x2] with x1 = x[..., :H//2];  y1 = x1 + F(x2);  y2 = x2 + G(y1)
inverse: x2 = y2 - G(y1);  x1 = y1 - F(x2)
F(z) = f2(act(f0(z))), G(z) = g2(act(g0(z))).

Bank: the four linears of every adapter and its activation (a code), one slot each (hidden
widths zero-padded); `bottleneck.banked_mlp` computes F and G per token, as it computes a
bottleneck; tokens whose slot has no invertible adapter keep their embedding (`torch.where`).
The inverse only runs inside flex LM heads, which take the side path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..adapters import Adapter, Invertible
from .bottleneck import activation, banked_mlp

PARTS = ("f0", "f2", "g0", "g2")


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


def banked_forward(w: dict, activations: tuple[str, ...], x: Tensor, slots: Tensor) -> Tensor:
    """forward(inv_i, x_i) for every token i (inv_i = the adapter in slot slots[i]); x [n, H]."""
    half = x.shape[-1] // 2
    x1, x2 = x[:, :half], x[:, half:]
    codes = w["activation"][slots]
    y1 = x1 + banked_mlp(w, "f0", "f2", activations, codes, x2, slots)
    y2 = x2 + banked_mlp(w, "g0", "g2", activations, codes, y1, slots)
    return torch.where(w["present"][slots][:, None], torch.cat([y1, y2], dim=-1), x)


class InvertibleBank:
    """One table for every slot's coupling, whatever its activation (a code per slot, as the
    bottleneck bank) and hidden widths (zero-padded to the widest): one gathered pass."""

    kind = "invertible"

    def __init__(self, info, capacity: int, device: torch.device, dtype: torch.dtype):
        self.info, self.capacity, self.device, self.dtype = info, capacity, device, dtype
        self.weights: dict | None = None  # part -> [slots, ...] tensors, "activation" codes, "present"
        self.activations: tuple[str, ...] = ()  # names, by activation code
        self.held: dict[int, Invertible] = {}

    @staticmethod
    def accepts(adapter: Adapter) -> bool:
        return True

    def signature(self) -> tuple:
        w = self.weights
        return () if w is None else (self.activations, tuple(w["f0"].shape), tuple(w["g0"].shape))

    def _tensors(self, inv: Invertible) -> dict:
        """The table, grown if this adapter's hidden widths are wider (zero padding is exact)."""
        w = self.weights
        widths = {p: getattr(inv, p + "_weight").shape[0] for p in ("f0", "g0")}
        if w is not None and all(w[p].shape[1] >= widths[p] for p in widths):
            return w
        C, kw = self.capacity, {"device": self.device, "dtype": self.dtype}
        grown = {"present": torch.zeros(C, dtype=torch.bool, device=self.device),
                 "activation": torch.zeros(C, dtype=torch.long, device=self.device)}
        for first, second in (("f0", "f2"), ("g0", "g2")):
            width = max(widths[first], w[first].shape[1] if w is not None else 0)
            inp = getattr(inv, first + "_weight").shape[1]
            out = getattr(inv, second + "_weight").shape[0]
            grown[first], grown[first + "_bias"] = torch.zeros(C, width, inp, **kw), torch.zeros(C, width, **kw)
            grown[second], grown[second + "_bias"] = torch.zeros(C, out, width, **kw), torch.zeros(C, out, **kw)
            if w is not None:
                old = w[first].shape[1]
                grown[first][:, :old], grown[first + "_bias"][:, :old] = w[first], w[first + "_bias"]
                grown[second][:, :, :old], grown[second + "_bias"][:] = w[second], w[second + "_bias"]
        if w is not None:
            grown["present"][:], grown["activation"][:] = w["present"], w["activation"]
        self.weights = grown
        return grown

    def write(self, slot: int, adapter: Adapter) -> None:
        inv = adapter.invertible
        if inv is None:
            return
        H = self.info.hidden_size
        if (inv.f0_weight.shape[1], inv.f2_weight.shape[0], inv.g0_weight.shape[1], inv.g2_weight.shape[0]) != \
                (H - H // 2, H // 2, H // 2, H - H // 2):
            raise ValueError(f"invertible adapter does not fit hidden size {H}")
        self.held[slot] = inv
        w = self._tensors(inv)
        self._zero(w, slot)
        for first, second in (("f0", "f2"), ("g0", "g2")):
            width = getattr(inv, first + "_weight").shape[0]
            w[first][slot, :width] = getattr(inv, first + "_weight")
            w[first + "_bias"][slot, :width] = getattr(inv, first + "_bias")
            w[second][slot, :, :width] = getattr(inv, second + "_weight")
            w[second + "_bias"][slot] = getattr(inv, second + "_bias")
        name = inv.activation.lower()
        if name not in self.activations:
            self.activations += (name,)
        w["activation"][slot] = self.activations.index(name)
        w["present"][slot] = True

    @staticmethod
    def _zero(w: dict, slot: int) -> None:
        for value in w.values():
            value[slot] = 0

    def clear(self, slot: int) -> None:
        if self.held.pop(slot, None) is not None and self.weights is not None:
            self._zero(self.weights, slot)

    def active_sites(self, slots) -> set:
        return {"embeddings" for s in slots if s in self.held}

    @staticmethod
    def route(site) -> None:
        return None

    def uses(self, slot: int, route) -> bool:
        return slot in self.held

    def embeddings(self, h: Tensor, slots: Tensor, groups) -> Tensor:
        if self.weights is None:
            return h
        if groups is None:
            return banked_forward(self.weights, self.activations, h, slots)
        for slot, tokens in groups:
            if (inv := self.held.get(slot)) is not None:
                h[tokens] = forward(inv, h[tokens])
        return h
