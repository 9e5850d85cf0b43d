"""Where a request's tokens go in the KV cache and which positions they take, given its
adapter setup; and a one-shot batched forward over whole sequences (`forward_sequences`),
which the engine's scoring path and the tests use.

Token-space methods change the layout of a row (DESIGN.md, "Adapter sites"):
  prefix tuning  L extra KV entries at cache indices 0..L-1 (a Stack concatenates them as
                 [P_n; ...; P_1]); PEFT shifts the real tokens' positions by L, AdapterHub not.
  prompt tuning  n virtual tokens before the real ones, with positions 0..n-1; the real
                 tokens follow at n.. (PEFT). Their logits are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .batch import ForwardBatch, Setup, build_adapter_batch
from .errors import InvalidRequest
from .models.common import KVCache


@dataclass(frozen=True)
class RowLayout:
    prefix_len: int  # KV entries before the first token
    position_offset: int  # position of the first (virtual or real) token
    virtual_tokens: int  # soft-prompt tokens prepended to the real ones

    def positions(self, start: int, count: int) -> list[int]:
        """Positions of tokens start..start+count-1 (counted from the first virtual token)."""
        return list(range(self.position_offset + start, self.position_offset + start + count))


def row_layout(setup: Setup) -> RowLayout:
    prefixes = [a.prefix for a in setup if a.prefix is not None]
    prompts = [a.prompt for a in setup if a.prompt is not None]
    if len(prompts) > 1:
        raise InvalidRequest("a setup can hold at most one prompt-tuning adapter")
    prefix_len = sum(p.length for p in prefixes)
    shift = sum(p.length for p in prefixes if p.shifts_positions)
    return RowLayout(prefix_len, shift, prompts[0].length if prompts else 0)


def prefix_kv(setup: Setup, layer: int) -> tuple[Tensor, Tensor] | None:
    """The setup's prefix entries for one layer, [n_kv, L_total, hd] each; a Stack's later
    adapters come first ([P_n; ...; P_1], reference §7.2.4)."""
    keys, values = [], []
    for a in reversed(setup):
        if a.prefix is not None and layer in a.prefix.keys:
            keys.append(a.prefix.keys[layer])
            values.append(a.prefix.values[layer])
    if not keys:
        return None
    return torch.cat(keys, dim=1), torch.cat(values, dim=1)


def write_prefixes(cache: KVCache, slot: int, setup: Setup, num_layers: int) -> None:
    """Fill the slot's leading cache entries, per layer, with the prefixes present there."""
    for layer in range(num_layers):
        if (kv := prefix_kv(setup, layer)) is not None:
            cache.write_prefix(slot, layer, *kv)


def prefix_len_at(setup: Setup, layer: int) -> int:
    """How many prefix entries the setup has at `layer` (prefixes may leave layers out)."""
    return sum(a.prefix.length for a in setup if a.prefix is not None and layer in a.prefix.keys)


def hidden_prefix_ranges(setups: Sequence[Setup], num_layers: int, device) -> dict[int, tuple[Tensor, Tensor]]:
    """Per layer where some row's prefixes are shorter than its total prefix (a prefix with
    `leave_out`): the cache index range [lo, hi) that rows must not see there, [B] each."""
    totals = [row_layout(s).prefix_len for s in setups]
    if not any(totals):
        return {}
    hidden = {}
    for layer in range(num_layers):
        present = [prefix_len_at(s, layer) for s in setups]
        if present != totals:
            hidden[layer] = (torch.tensor(present, device=device), torch.tensor(totals, device=device))
    return hidden


def forward_sequences(
    model,
    token_rows: Sequence[Sequence[int]],
    setups: Sequence[Setup] | None = None,
    device: torch.device | str = "cpu",
    merged=None,
) -> list[Tensor]:
    """Logits for every real token of every row, [len(row), V] each, in one batched forward
    with a fresh cache: rows may differ in length and in adapter setup. `merged`: the
    `MergedAdapter` folded into the model's weights, if any (as the engine passes it)."""
    setups = list(setups) if setups is not None else [()] * len(token_rows)
    info = model.info
    layouts = [row_layout(s) for s in setups]
    tokens = [[0] * lay.virtual_tokens + list(row) for row, lay in zip(token_rows, layouts)]
    max_len = max(lay.prefix_len + len(t) for lay, t in zip(layouts, tokens))
    dtype = next(model.parameters()).dtype
    cache = KVCache(info, len(tokens), max_len, dtype, torch.device(device))
    for slot, setup in enumerate(setups):
        write_prefixes(cache, slot, setup, info.num_layers)
    seq_len = max(len(t) for t in tokens)
    adapters = build_adapter_batch(
        setups, [len(t) for t in tokens], [lay.virtual_tokens > 0 for lay in layouts], seq_len, torch.device(device),
        merged=merged,
    )
    batch = ForwardBatch.build(
        tokens,
        [lay.positions(0, len(t)) for lay, t in zip(layouts, tokens)],
        list(range(len(tokens))),
        [lay.prefix_len for lay in layouts],
        torch.device(device),
        adapters=adapters,
        all_logits=True,
        prefix_hidden=hidden_prefix_ranges(setups, info.num_layers, torch.device(device)),
    )
    with torch.inference_mode():
        logits = model(batch, cache)  # [B, S, V]
    return [logits[b, lay.virtual_tokens : len(t)] for b, (lay, t) in enumerate(zip(layouts, tokens))]
