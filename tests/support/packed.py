"""A one-shot packed forward over whole sequences with a fresh KV cache, outside the engine:
what the tests compare with transformers and the adapter libraries (rows may differ in length
and in adapter setup; the same ForwardBatch and adapter sites as an engine step)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from adapter_runtime.batch import ForwardBatch, Setup, build_adapter_step
from adapter_runtime.layout import row_layout
from adapter_runtime.methods import prefix as prefix_method
from adapter_runtime.models.common import KVCache


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
