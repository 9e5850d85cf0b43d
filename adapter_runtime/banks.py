"""The adapters on the device as *data*: one bank per banked method (methods/*.py), one slot
per adapter, slot 0 the identity (no adapter). A step carries each token's slot; a change of
batch composition rewrites that index tensor and never restacks weights.

Adding a banked method: write its bank class in methods/<method>.py (kind, accepts, signature,
write, clear, active_sites and its site functions) and list it in BANKED_METHODS.

Slots are keyed by the adapter's identity (`uid` when the adapter carries one, else the
object itself, which the bank keeps alive while it holds a slot), never by name. Slots are
reused least recently used first, never while a running request uses them.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Iterable

import torch

from .adapters import Adapter
from .methods.bottleneck import BottleneckBank
from .methods.ia3 import ScaleBank
from .methods.invertible import InvertibleBank
from .methods.lora import LoRABank

log = logging.getLogger(__name__)

BANKED_METHODS = (LoRABank, ScaleBank, BottleneckBank, InvertibleBank)
BANKABLE_MEMO = 4096  # adapters whose bankable() answer is remembered


def adapter_key(adapter: Adapter) -> tuple:
    """Identity of an adapter's banked content: its uid (or the object), and whether it still
    has linear effects (a merged adapter's rows use a copy without them, with the same uid)."""
    uid = getattr(adapter, "uid", None)
    return (uid if uid else id(adapter), bool(adapter.linear))


def bankable(adapter: Adapter) -> bool:
    """Every part of the adapter has a bank (or needs none: prefix, prompt). ReFT interventions
    and flex heads run on the side path."""
    return adapter.head is None and adapter.reft is None and all(cls.accepts(adapter) for cls in BANKED_METHODS)


class AdapterBanks:
    def __init__(self, info, capacity: int, device: torch.device, dtype: torch.dtype):
        self.capacity = capacity + 1  # + the identity slot 0
        self.banks = {cls.kind: cls(info, self.capacity, device, dtype) for cls in BANKED_METHODS}
        self._slots: OrderedDict[tuple, tuple[int, Adapter]] = OrderedDict()  # key -> (slot, adapter), LRU order
        self._free = list(range(self.capacity - 1, 0, -1))  # pop() takes the lowest
        self._bankable: OrderedDict[tuple, bool] = OrderedDict()  # adapter_key -> bankable(adapter)
        self.generation = 0  # counts every change of what the slots hold (a step built earlier is stale)

    def bankable(self, adapter: Adapter) -> bool:
        """`bankable(adapter)`, remembered by content identity: every step asks it of every row,
        and it walks all of the adapter's effects (a quarter of a LoRA step's host time)."""
        key = adapter_key(adapter)
        if not getattr(adapter, "uid", None):
            return bankable(adapter)
        known = self._bankable.get(key)
        if known is None:
            known = self._bankable[key] = bankable(adapter)
            if len(self._bankable) > BANKABLE_MEMO:
                self._bankable.popitem(last=False)
        return known

    def __getitem__(self, kind: str):
        return self.banks[kind]

    def signature(self) -> tuple:
        """Shapes of every bank: a compiled step is valid while this stays the same."""
        return tuple((kind, bank.signature()) for kind, bank in self.banks.items())

    def slot(self, adapter: Adapter, in_use: Iterable[int] = ()) -> int:
        """The adapter's slot, writing it into the banks if it has none (evicting the least
        recently used slot that no row of the step uses)."""
        key = adapter_key(adapter)
        entry = self._slots.get(key)
        if entry is not None:
            self._slots.move_to_end(key)
            return entry[0]
        if not self._free:
            busy = set(in_use)
            victim = next((k for k, (s, _) in self._slots.items() if s not in busy), None)
            if victim is None:
                raise RuntimeError(f"all {self.capacity - 1} adapter bank slots are in use")
            slot, _ = self._slots.pop(victim)
            for bank in self.banks.values():
                bank.clear(slot)
            self._free.append(slot)
        slot = self._free.pop()
        self.generation += 1
        try:
            for bank in self.banks.values():
                bank.write(slot, adapter)
        except BaseException:  # e.g. weights that do not fit the model: leave the slot empty
            for bank in self.banks.values():
                bank.clear(slot)
            self._free.append(slot)
            raise
        self._slots[key] = (slot, adapter)
        return slot

    def peek(self, adapter: Adapter) -> int | None:
        entry = self._slots.get(adapter_key(adapter))
        return entry[0] if entry is not None else None

    def drop(self, adapter: Adapter) -> None:
        entry = self._slots.pop(adapter_key(adapter), None)
        if entry is not None:
            self.generation += 1
            for bank in self.banks.values():
                bank.clear(entry[0])
            self._free.append(entry[0])

    def active(self, slots: Iterable[int], static: bool) -> dict[str, frozenset]:
        """kind -> the sites to apply in a step whose tokens use `slots`. Eager steps skip
        sites no token's adapter touches; a static (compiled) step applies every site of each
        kind any token uses, so its code path depends on the kinds present, not on the mix."""
        used = set(slots) - {0}
        out = {}
        for kind, bank in self.banks.items():
            sites = bank.active_sites(used)
            if sites:
                out[kind] = frozenset(bank.active_sites(bank.held)) if static else frozenset(sites)
        return out
