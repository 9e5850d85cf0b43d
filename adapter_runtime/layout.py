"""Where a request's tokens go in the KV cache and which positions they take, given its
adapter setup (`row_layout`, which the engine and the scheduler use); and a one-shot batched
forward over whole sequences with a fresh cache (`forward_sequences`), which only the tests
use, to check a model's packed forward against transformers outside the engine.

Token-space methods change the layout of a row (DESIGN.md, "Adapter sites"; the methods
themselves are methods/prefix.py and methods/prompt.py):
  prefix tuning  L extra KV entries at cache indices 0..L-1; PEFT shifts the real tokens'
                 positions by L, AdapterHub not.
  prompt tuning  n virtual tokens before the real ones, with positions 0..n-1; the real
                 tokens follow at n.. (PEFT). Their logits are dropped.
  ReFT suffix    the intervened window is the row's last tokens: a decode step re-runs them
                 (`recompute`), and the prompt is prefilled in one chunk (methods/reft.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .batch import ForwardBatch, Setup, build_adapter_step
from .errors import InvalidRequest
from .methods import prefix as prefix_method
from .methods import prompt as prompt_method
from .methods import reft as reft_method
from .models.common import KVCache


@dataclass(frozen=True)
class RowLayout:
    prefix_len: int  # KV entries before the first token
    position_offset: int  # position of the first (virtual or real) token
    virtual_tokens: int  # soft-prompt tokens prepended to the real ones
    recompute: int = 0  # tokens before the newest that each decode step re-runs (ReFT suffix window)

    def positions(self, start: int, count: int) -> list[int]:
        """Positions of tokens start..start+count-1 (counted from the first virtual token)."""
        return list(range(self.position_offset + start, self.position_offset + start + count))


def row_layout(setup: Setup) -> RowLayout:
    if sum(a.prompt is not None for a in setup) > 1:
        raise InvalidRequest("a setup can hold at most one prompt-tuning adapter")
    return RowLayout(prefix_method.total_length(setup), prefix_method.position_shift(setup),
                     prompt_method.virtual_tokens(setup), reft_method.window(setup))


def forward_sequences(
    model,
    token_rows: Sequence[Sequence[int]],
    setups: Sequence[Setup] | None = None,
    device: torch.device | str = "cpu",
    merged=None,
    banks=None,
    gather: bool | None = None,
) -> list[Tensor]:
    """Logits for every real token of every row, [len(row), V] each, in one packed forward
    with a fresh cache: rows may differ in length and in adapter setup. `merged`: the
    `MergedAdapter` folded into the model's weights, if any (as the engine passes it).
    `banks`: serve single adapters from these banks (as the engine does), else every adapter
    row runs the side path's reference math; `gather` forces the banks' per-token gathers."""
    setups = list(setups) if setups is not None else [()] * len(token_rows)
    info = model.info
    device = torch.device(device)
    layouts = [row_layout(s) for s in setups]
    tokens = [[0] * lay.virtual_tokens + list(row) for row, lay in zip(token_rows, layouts)]
    # one-token rows go first (the batch's decode rows): order rows by length, then undo it
    order = sorted(range(len(tokens)), key=lambda b: len(tokens[b]) != 1)
    tokens, setups, layouts = [tokens[b] for b in order], [setups[b] for b in order], [layouts[b] for b in order]
    max_len = max(lay.prefix_len + len(t) for lay, t in zip(layouts, tokens))
    dtype = next(model.parameters()).dtype
    cache = KVCache(info, len(tokens), max_len, dtype, device)
    for slot, setup in enumerate(setups):
        prefix_method.write(cache, slot, setup, info.num_layers)
    counts = [len(t) for t in tokens]
    logit_rows = [list(range(sum(counts[:b]), sum(counts[: b + 1]))) for b in range(len(counts))]
    adapters = build_adapter_step(setups, counts, device, banks=banks, merged=merged, gather=gather,
                                  logit_rows=logit_rows)
    batch = ForwardBatch.build(
        tokens,
        [lay.positions(0, len(t)) for lay, t in zip(layouts, tokens)],
        list(range(len(tokens))),
        [lay.prefix_len for lay in layouts],
        device,
        adapters=adapters,
        all_logits=True,
        prefix_hidden=prefix_method.hidden_ranges(setups, info.num_layers, device),
    )
    with torch.inference_mode():
        logits = model(batch, cache)  # [N, V]
    out = [logits[f + lay.virtual_tokens : f + len(t)] for f, lay, t in
           zip([r.first for r in batch.rows], layouts, tokens)]
    result: list[Tensor] = [None] * len(out)  # type: ignore[list-item]
    for position, b in enumerate(order):
        result[b] = out[position]
    return result
