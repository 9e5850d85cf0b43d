"""LoRA (and PEFT DoRA, AdapterHub gated LoRA) at a linear site.

Reference loop for one row x (tokens [n, in]) through y = base(x):
    y = y + scale * ((x @ A.T) @ B.T + bias)
gated (AdapterHub, UniPELT): scale = mean over the row's tokens of sigmoid(x @ gate_w.T + gate_b),
one value per output block; DoRA (PEFT): y = m / ||W + s B A||_row * (y - b + s (x A.T) B.T) + b.

Bank: per site (layer, module) one A [slots, r_max, in] and one B^T [slots, r_max, out] with the
scale folded in; slot 0 (rows without LoRA there) is all zeros, so its delta is an exact 0.
B is stored transposed so that the expand step sums over the rank with the output contiguous:
compiled, its dot products of length r (less than one vector) ran at half the speed (profiled).
Plain LoRAs are banked; gated, biased and DoRA LoRAs take the side path (batch.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..adapters import Adapter, LoRA
from . import token_mean


def lora_scale(lora: LoRA, x: Tensor, segments: Tensor | None) -> Tensor | float:
    """alpha/r, or for gated LoRA the per-row, per-output-block gate (broadcast to [n, out])."""
    if lora.gate_weight is None:
        return lora.scale
    gate = token_mean(torch.sigmoid(x @ lora.gate_weight.T + lora.gate_bias), segments)  # [n, blocks]
    return gate.repeat_interleave(lora.B.shape[0] // gate.shape[-1], dim=-1)  # [n, out]


def lora_delta(lora: LoRA, z: Tensor, x: Tensor, segments: Tensor | None) -> Tensor:
    """scale * ((z @ A.T) @ B.T + bias); z is the LoRA input, x the layer input (for the gate)."""
    delta = (z @ lora.A.T) @ lora.B.T
    if lora.bias is not None:
        delta = delta + lora.bias
    return delta * lora_scale(lora, x, segments)


def is_plain(e) -> bool:
    return isinstance(e, LoRA) and e.gate_weight is None and e.bias is None and e.magnitude is None


# --------------------------------------------------------------------------- DoRA
# PEFT DoRA (reference peft §2.6): the norm of each output row of W + s B A is taken from the
# base weight, so it is computed where the base linear is known (the side path memoizes it).


def dora_ratio(lora: LoRA, weight: Tensor) -> Tensor:
    """m / ||W + s B A||_row -> [out], from the base weight [out, in]."""
    V = weight.float() + lora.scale * (lora.B.float() @ lora.A.float())
    return (lora.magnitude.float() / V.norm(dim=1)).to(weight.dtype)


def dora_output(x: Tensor, y: Tensor, lora: LoRA, ratio: Tensor, base_bias: Tensor | None) -> Tensor:
    """y = base(x) (bias b included) -> ratio * (y - b + s (x A.T) B.T) + b."""
    y_nobias = y - base_bias if base_bias is not None else y
    out = ratio * (y_nobias + lora_delta(lora, x, x, None))
    return out + base_bias if base_bias is not None else out


# --------------------------------------------------------------------------- bank


def banked_delta(x: Tensor, A: Tensor, Bt: Tensor, slots: Tensor) -> Tensor:
    """x [n, in], A [slots, r, in], Bt [slots, r, out] (B transposed, scale folded), slots [n] ->
    [n, out]: token i gets B[slots[i]] @ A[slots[i]] @ x[i]  (the reference loop, per token)."""
    z = torch.bmm(A[slots], x[:, :, None])  # [n, r, 1]
    return torch.bmm(z.transpose(1, 2), Bt[slots])[:, 0]  # [n, out]


class LoRABank:
    """Plain LoRAs of the adapters on the device, per linear site, one slot per adapter."""

    kind = "lora"

    def __init__(self, info, capacity: int, device: torch.device, dtype: torch.dtype):
        self.info, self.capacity, self.device, self.dtype = info, capacity, device, dtype
        self.sites: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}  # site -> (A, B^T)
        self.held: dict[int, dict] = {}  # slot -> {site: LoRA} (for the per-slot path)

    @staticmethod
    def accepts(adapter: Adapter) -> bool:
        return all(is_plain(e) for e in adapter.linear.values() if isinstance(e, LoRA))

    def signature(self) -> tuple:
        return tuple(sorted((site, tuple(A.shape)) for site, (A, _) in self.sites.items()))

    def write(self, slot: int, adapter: Adapter) -> None:
        mine = {site: e for site, e in adapter.linear.items() if isinstance(e, LoRA)}
        self.held[slot] = mine
        for site, lora in mine.items():
            r = lora.A.shape[0]
            inp, out = self.info.linear_shapes[site[1]]  # the base linear's, whatever the adapter says
            A, Bt = self.sites.get(site, (None, None))
            if A is None or A.shape[1] < r:  # a new site or a larger rank: grow (zero padding is exact)
                grown_A = torch.zeros(self.capacity, r, inp, device=self.device, dtype=self.dtype)
                grown_Bt = torch.zeros(self.capacity, r, out, device=self.device, dtype=self.dtype)
                if A is not None:
                    grown_A[:, : A.shape[1]] = A
                    grown_Bt[:, : A.shape[1]] = Bt
                A, Bt = self.sites[site] = grown_A, grown_Bt
            A[slot].zero_()
            Bt[slot].zero_()
            A[slot, :r] = lora.A.to(self.dtype)
            Bt[slot, :r] = (lora.B.float() * lora.scale).T.to(self.dtype)

    def clear(self, slot: int) -> None:
        for site in self.held.pop(slot, {}):
            if site not in self.sites:
                continue
            A, Bt = self.sites[site]
            A[slot].zero_()
            Bt[slot].zero_()

    def has(self, slot: int, site) -> bool:
        return site in self.held.get(slot, {})

    def active_sites(self, slots) -> set:
        return {site for s in slots for site in self.held.get(s, {})}

    @staticmethod
    def route(site) -> None:
        """One slot index for every LoRA site (its cost is per site, not its few weight bytes)."""
        return None

    def uses(self, slot: int, route) -> bool:
        return bool(self.held.get(slot))

    def output(self, site, x: Tensor, y: Tensor, slots: Tensor, groups) -> Tensor:
        """y + each token's LoRA delta at `site`. `groups` None: one gather per token (few
        tokens, static shapes); else [(slot, token index [k])]: the reference math per slot."""
        if site not in self.sites:
            return y
        if groups is None:
            A, Bt = self.sites[site]
            return y + banked_delta(x, A, Bt, slots)
        for slot, tokens in groups:
            lora = self.held.get(slot, {}).get(site)
            if lora is not None:
                y[tokens] = y[tokens] + lora_delta(lora, x[tokens], x[tokens], None)
        return y
