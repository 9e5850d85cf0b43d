"""Prefix tuning: L extra key/value entries per attention layer, already flat (any MLP is
evaluated at load). Its "bank" is the KV cache itself: a request's prefix is written once, at
admission, into cache indices 0..L-1 of its slot, and every later token attends to it.

Layout (DESIGN.md): a Stack concatenates prefixes as [P_n; ...; P_1] (reference §7.2.4). PEFT
numbers the real tokens from L (`shifts_positions`); AdapterHub keeps 0..S-1. A prefix may leave
layers out: there the row's queries must not see those cache entries (`hidden_ranges`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..adapters import Adapter


def total_length(setup: Sequence[Adapter]) -> int:
    return sum(a.prefix.length for a in setup if a.prefix is not None)


def position_shift(setup: Sequence[Adapter]) -> int:
    return sum(a.prefix.length for a in setup if a.prefix is not None and a.prefix.shifts_positions)


def kv(setup: Sequence[Adapter], layer: int) -> tuple[Tensor, Tensor] | None:
    """The setup's prefix entries for one layer, [n_kv, L_total, hd] each; a Stack's later
    adapters come first."""
    keys, values = [], []
    for a in reversed(setup):
        if a.prefix is not None and layer in a.prefix.keys:
            keys.append(a.prefix.keys[layer])
            values.append(a.prefix.values[layer])
    if not keys:
        return None
    return torch.cat(keys, dim=1), torch.cat(values, dim=1)


def write(cache, slot: int, setup: Sequence[Adapter], num_layers: int) -> None:
    """Fill the slot's leading cache entries, per layer, with the prefixes present there."""
    for layer in range(num_layers):
        if (entries := kv(setup, layer)) is not None:
            cache.write_prefix(slot, layer, *entries)


def length_at(setup: Sequence[Adapter], layer: int) -> int:
    """How many prefix entries the setup has at `layer` (prefixes may leave layers out)."""
    return sum(a.prefix.length for a in setup if a.prefix is not None and layer in a.prefix.keys)


def hidden_ranges(setups: Sequence[Sequence[Adapter]], num_layers: int, device) -> dict[int, tuple[Tensor, Tensor]]:
    """Per layer where some row's prefixes are shorter than its total prefix (a prefix with
    `leave_out`): the cache index range [lo, hi) that the row must not see there, [R] each."""
    totals = [total_length(s) for s in setups]
    if not any(totals):
        return {}
    hidden = {}
    for layer in range(num_layers):
        present = [length_at(s, layer) for s in setups]
        if present != totals:
            hidden[layer] = (torch.tensor(present, device=device), torch.tensor(totals, device=device))
    return hidden
