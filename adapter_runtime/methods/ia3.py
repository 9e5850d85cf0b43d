"""(IA)^3 at a linear site: an elementwise scale of the output (bias included) or, for PEFT's
feed-forward modules, of the input.

Reference loop for one row x through y = base(x):
    output scale:  y = base(x) * l        l [out]
    input scale:   y = base(x * l)        l [in]

Bank: per site one vector per slot, [slots, dim]; slot 0 and adapters without a scale there
hold ones, so `x * 1.0` leaves those rows bit for bit unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..adapters import Adapter, Scale


class ScaleBank:
    kind = "ia3"

    def __init__(self, info, capacity: int, device: torch.device, dtype: torch.dtype):
        self.info, self.capacity, self.device, self.dtype = info, capacity, device, dtype
        self.sites: dict[tuple[tuple[int, str], bool], Tensor] = {}  # (site, on_input) -> [slots, dim]
        self.held: dict[int, dict] = {}  # slot -> {(site, on_input): Scale}

    @staticmethod
    def accepts(adapter: Adapter) -> bool:
        return True

    def signature(self) -> tuple:
        return tuple(sorted((key, tuple(v.shape)) for key, v in self.sites.items()))

    def write(self, slot: int, adapter: Adapter) -> None:
        mine = {(site, e.on_input): e for site, e in adapter.linear.items() if isinstance(e, Scale)}
        self.held[slot] = mine
        for key, scale in mine.items():
            if key not in self.sites:
                inp, out = self.info.linear_shapes[key[0][1]]
                self.sites[key] = torch.ones(self.capacity, inp if key[1] else out, device=self.device, dtype=self.dtype)
            self.sites[key][slot] = scale.vector.to(self.dtype)

    def clear(self, slot: int) -> None:
        for key in self.held.pop(slot, {}):
            if key in self.sites:
                self.sites[key][slot] = 1.0

    def has_input_scale(self, site) -> bool:
        return (site, True) in self.sites

    def active_sites(self, slots) -> set:
        return {key for s in slots for key in self.held.get(s, {})}

    @staticmethod
    def route(site) -> None:
        return None

    def uses(self, slot: int, route) -> bool:
        return bool(self.held.get(slot))

    def scale(self, site, on_input: bool, t: Tensor, slots: Tensor) -> Tensor:
        """t [n, dim] times each token's vector (ones where its adapter has none here)."""
        vectors = self.sites.get((site, on_input))
        return t if vectors is None else t * vectors[slots]
