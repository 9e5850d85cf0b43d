"""Per-step batch metadata: one frozen `ForwardBatch` is passed down through the model.

The model runs its base ops once for all rows; at each adapter site it calls the batch's
`AdapterBatch`, which adds each adapter setup's effect to that setup's rows only. A row whose
request names no adapter is in no group and pays nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .adapters import Adapter, LinearEffect, LoRA, Scale
from .methods import bottleneck as bottleneck_math
from .methods import head as head_math
from .methods import invertible as invertible_math
from .methods import lora as linear_math

Setup = tuple[Adapter, ...]  # adapters of one request, in Stack order (usually one)


@dataclass(frozen=True)
class AdapterGroup:
    """The rows of one step that share an adapter setup."""

    rows: Tensor  # [n] row indices into the batch
    setup: Setup
    token_mask: Tensor | None  # [n, S, 1] 1.0 on valid tokens; None when no row is padded
    all_rows: bool  # the group is the whole batch, in order: no gather/scatter needed
    prompt_in_chunk: bool  # this chunk starts with the setup's virtual prompt tokens

    def take(self, t: Tensor) -> Tensor:
        return t if self.all_rows else t[self.rows]

    def put(self, dst: Tensor, value: Tensor) -> Tensor:
        if self.all_rows:
            return value
        dst[self.rows] = value
        return dst

    def linear_effects(self, layer: int, module: str) -> list[LinearEffect]:
        return [e for a in self.setup if (e := a.linear.get((layer, module))) is not None]

    def bottlenecks(self, layer: int, location: str) -> list:
        return [b for a in self.setup if (b := a.bottleneck.get((layer, location))) is not None]


# From this many groups of one kind at one site, gathered batched ops replace the group loop.
GATHERED_MIN_GROUPS = 2


@dataclass(frozen=True)
class AdapterBatch:
    groups: tuple[AdapterGroup, ...] = ()
    # per-site plans with stacked weights for the gathered paths; a memo, reused while the
    # engine keeps this AdapterBatch (a decode batch whose rows do not change)
    _plans: dict = field(default_factory=dict, compare=False, repr=False)
    # while an adapter is merged into the base weights: the rows that do not use it, and per
    # linear site the effect that takes the merged output back to the base output
    unmerge: "Unmerge | None" = None
    batch_size: int = 0  # rows in the step (0 = unknown)

    # ---- linear sites: LoRA deltas, (IA)^3 scales
    def linear(self, layer: int, module: str, base: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """base(x) [.., out] plus each group's effect at (layer, module).

        Reference: for each group, y[rows] = apply_output(x[rows], y[rows], effects). Groups
        whose single effect is a plain LoRA, an output scale or an input scale are instead
        applied together per kind (`_linear_plan`), which gives the same numbers per row."""
        undo = self.unmerge.effects.get((layer, module)) if self.unmerge is not None else None
        plan = self._linear_plan(layer, module)
        if plan is None and undo is None:
            return base(x)
        loras, out_scales, in_scales, rest = plan or (None, None, None, ())
        # input scales act before the shared base op; x feeds other sites: never scale in place
        x_in = x
        if undo is not None:
            x_in = _put(x_in, self.unmerge.rows, linear_math.scale_input(self.unmerge.rows.take(x_in), [undo]), x)
        if in_scales is not None:
            rows, vectors = in_scales
            x_in = x_in * vectors if rows is None else _scatter(x_in, rows, x_in[rows] * vectors, x)
        for g, effects in rest:
            if any(isinstance(e, Scale) and e.on_input for e in effects):
                x_in = _put(x_in, g, linear_math.scale_input(g.take(x_in), effects), x)
        y = base(x_in)
        if undo is not None:  # back to the base output first, then the rows' own effects
            rows = self.unmerge.rows
            y = rows.put(y, linear_math.apply_output(rows.take(x_in), rows.take(y), [undo], None))
        if loras is not None:
            rows, A, B = loras
            # rows are distinct: a gather and a put beat index_add_ (a slow scatter on CPU)
            y = y + linear_math.gathered_lora_delta(x, A, B) if rows is None else \
                _scatter(y, rows, y[rows] + linear_math.gathered_lora_delta(x[rows], A, B), None)
        if out_scales is not None:
            rows, vectors = out_scales
            y = y * vectors if rows is None else _scatter(y, rows, y[rows] * vectors, None)
        for g, effects in rest:
            if isinstance(dora := effects[0], LoRA) and dora.magnitude is not None:  # alone: stacks refuse PEFT
                ratio, bias = self._dora_ratio(layer, module, base, dora, undo)
                y = g.put(y, linear_math.dora_output(g.take(x), g.take(y), dora, ratio, bias))
            else:
                y = g.put(y, linear_math.apply_output(g.take(x), g.take(y), effects, g.token_mask))
        return y

    def _dora_ratio(self, layer: int, module: str, base, dora: LoRA, undo: LinearEffect | None):
        """DoRA's per-row factor from the *original* base weight (a merged adapter's delta is
        taken back out first), once per batch composition."""
        key = ("dora", layer, module, id(dora))
        if key not in self._plans:
            weight, bias = base.weight, base.bias
            if undo is not None:
                from .methods.merge import merged_weights

                weight, bias = merged_weights(undo, weight, bias)
            self._plans[key] = (linear_math.dora_ratio(dora, weight), bias)
        return self._plans[key]

    def _linear_plan(self, layer: int, module: str):
        """None if no row has an effect here, else (loras, out_scales, in_scales, rest):
        stacked weights for the groups applied together per kind (None if fewer than two
        groups of that kind), and the (group, effects) applied one group at a time."""
        key = ("linear", layer, module)
        if key not in self._plans:
            touched = [(g, effects) for g in self.groups if (effects := g.linear_effects(layer, module))]
            kinds: dict[str, list] = {"lora": [], "out": [], "in": []}
            rest = []
            for g, effects in touched:
                kind = linear_math.gatherable_kind(effects) if g.token_mask is None else None
                (kinds[kind] if kind else rest).append((g, effects))
            for kind, members in kinds.items():
                if len(members) < GATHERED_MIN_GROUPS:
                    rest.extend(members)
                    kinds[kind] = None
                    continue
                counts = [len(g.rows) for g, _ in members]
                rows = torch.cat([g.rows for g, _ in members])
                effects = [e[0] for _, e in members]
                stacked = linear_math.stack_loras(effects, counts) if kind == "lora" else \
                    (linear_math.stack_scales(effects, counts),)
                kinds[kind] = self._in_row_order(rows, counts, stacked)
            self._plans[key] = None if not touched else (kinds["lora"], kinds["out"], kinds["in"], rest)
        return self._plans[key]

    def _in_row_order(self, rows: Tensor, counts: list[int], stacked: tuple[Tensor, ...]) -> tuple:
        """(rows, *stacked); rows None when the groups cover the whole batch (groups are
        disjoint, so the counts tell without a device sync): the stacks are then put in row
        order once, and applying them needs no gather or scatter."""
        if sum(counts) == self.batch_size:
            order = torch.argsort(rows)
            return (None, *(t[order] for t in stacked))
        return (rows, *stacked)

    # ---- residual sites: bottleneck adapters around a sublayer
    def residual(self, layer: int, location: str, sublayer_out: Tensor, residual: Tensor) -> Tensor:
        """The block's new hidden state: sublayer_out + residual, or the adapters' composition.

        Reference: for each group, h[rows] = compose(bottlenecks, s[rows], r[rows]). Plain
        sequential adapters of one activation are applied together (`_residual_plan`)."""
        h = sublayer_out + residual
        plan = self._residual_plan(layer, location)
        if plan is None:
            return h
        gathered, rest = plan
        for activation_name, (rows, stacked) in gathered.items():
            s = sublayer_out if rows is None else sublayer_out[rows]
            r = residual if rows is None else residual[rows]
            out = bottleneck_math.gathered_sequential(stacked, activation_name, s, r)
            h = out if rows is None else _scatter(h, rows, out, None)
        for g, adapters in rest:
            h = g.put(h, bottleneck_math.compose(adapters, g.take(sublayer_out), g.take(residual), g.token_mask))
        return h

    def _residual_plan(self, layer: int, location: str):
        key = ("residual", layer, location)
        if key not in self._plans:
            touched = [(g, adapters) for g in self.groups if (adapters := g.bottlenecks(layer, location))]
            by_activation: dict[str, list] = {}
            rest = []
            for g, adapters in touched:
                if len(adapters) == 1 and bottleneck_math.is_plain_sequential(adapters[0]):
                    by_activation.setdefault(adapters[0].activation, []).append((g, adapters))
                else:
                    rest.append((g, adapters))
            gathered = {}
            for name, members in by_activation.items():
                if len(members) < GATHERED_MIN_GROUPS:
                    rest.extend(members)
                    continue
                counts = [len(g.rows) for g, _ in members]
                rows = torch.cat([g.rows for g, _ in members])
                stacked = bottleneck_math.stack_sequential([a[0] for _, a in members], counts)
                ordered = self._in_row_order(rows, counts, tuple(stacked))
                gathered[name] = (ordered[0], type(stacked)(*ordered[1:]))
            self._plans[key] = None if not touched else (gathered, rest)
        return self._plans[key]

    # ---- embedding sites
    def token_embeddings(self, h: Tensor) -> Tensor:
        """Put soft-prompt vectors over the placeholder embeddings of the virtual tokens."""
        for g in self.groups:
            if g.prompt_in_chunk:
                prompt = next(a.prompt for a in g.setup if a.prompt is not None).embeddings
                rows = g.rows if not g.all_rows else torch.arange(h.shape[0], device=h.device)
                h[rows, : prompt.shape[0]] = prompt.to(h.dtype)
        return h

    def logits(self, h: Tensor, project: Callable[[Tensor], Tensor]) -> Tensor:
        """project(h) [.., V]; rows whose setup carries a flex LM head (the last adapter that
        has one) first go through its layers and, if the setup's first adapter is invertible,
        the NICE inverse, and get the head's bias added (AdapterHub flex-head models)."""
        heads = [(g, head) for g in self.groups if (head := next((a.head for a in reversed(g.setup) if a.head), None))]
        for g, head in heads:
            z = head_math.transform(head, g.take(h))
            if (inv := g.setup[0].invertible) is not None:
                z = invertible_math.inverse(inv, z)
            h = g.put(h, z)
        logits = project(h)
        for g, head in heads:
            if head.bias is not None:
                logits = g.put(logits, g.take(logits) + head.bias)
        return logits

    def embeddings(self, h: Tensor) -> Tensor:
        """Invertible (NICE) adapter of each setup's first adapter, on the embedding output."""
        for g in self.groups:
            if (inv := g.setup[0].invertible) is not None:
                h = g.put(h, invertible_math.forward(inv, g.take(h)))
        return h


NO_ADAPTERS = AdapterBatch()


def _scatter(dst: Tensor, rows: Tensor, value: Tensor, shared: Tensor | None) -> Tensor:
    """dst with dst[rows] = value; copies first when dst is `shared` (an input other sites read)."""
    if dst is shared:
        dst = dst.clone()
    dst[rows] = value
    return dst


def _put(dst: Tensor, group: AdapterGroup, value: Tensor, shared: Tensor) -> Tensor:
    if group.all_rows:
        return value
    return _scatter(dst, group.rows, value, shared)


@dataclass(frozen=True)
class Unmerge:
    rows: AdapterGroup  # rows whose setup does not hold the merged adapter (setup empty)
    effects: Mapping[tuple[int, str], LinearEffect]  # (layer, module) -> inverse effect


def without_linear(adapter: Adapter) -> Adapter:
    """The part of a merged adapter that still runs per row (a union's bottleneck, say)."""
    from dataclasses import replace

    return replace(adapter, linear={})


def build_adapter_batch(
    setups: Sequence[Setup],
    query_lens: Sequence[int],
    prompt_in_chunk: Sequence[bool],
    seq_len: int,
    device: torch.device,
    merged: "MergedAdapter | None" = None,
) -> AdapterBatch:
    """Group rows by setup (same adapters, same order). Rows with an empty setup are left out.

    With `merged` (an adapter folded into the base weights), rows using it drop its linear
    effects, and every other row gets the merged delta undone at each merged site."""
    unmerge = None
    if merged is not None:
        uid = merged.adapter.uid  # by content identity (the registry may hand out another copy of
        # it), never by name: the name may since belong to other weights
        using = [any(a.uid == uid for a in setup) for setup in setups]
        setups = [tuple(merged.residue if a.uid == uid else a for a in setup) for setup in setups]
        other_rows = [row for row, uses in enumerate(using) if not uses]
        if other_rows:
            rows_t = torch.tensor(other_rows, device=device, dtype=torch.long)
            group = AdapterGroup(rows_t, (), None, other_rows == list(range(len(setups))), False)
            unmerge = Unmerge(group, merged.inverse_effects)
    by_key: dict[tuple, list[int]] = {}
    for row, setup in enumerate(setups):
        if setup:
            by_key.setdefault((tuple(id(a) for a in setup), bool(prompt_in_chunk[row])), []).append(row)
    lens = torch.tensor(list(query_lens), device=device)
    padded = bool((lens != seq_len).any())
    groups = []
    for (_, prompt), rows in by_key.items():
        rows_t = torch.tensor(rows, device=device, dtype=torch.long)
        mask = None
        if padded:
            mask = (torch.arange(seq_len, device=device)[None, :] < lens[rows_t][:, None]).unsqueeze(-1).float()
        groups.append(
            AdapterGroup(
                rows=rows_t,
                setup=setups[rows[0]],
                token_mask=mask,
                all_rows=rows == list(range(len(setups))),
                prompt_in_chunk=prompt,
            )
        )
    return AdapterBatch(tuple(groups), unmerge=unmerge, batch_size=len(setups))


@dataclass(frozen=True)
class MergedAdapter:
    """An adapter whose linear effects are folded into the base weights (see merge.py)."""

    adapter: Adapter
    residue: Adapter  # the adapter without its linear effects: what its rows still run
    inverse_effects: Mapping[tuple[int, str], LinearEffect]


@dataclass(frozen=True)
class ForwardBatch:
    """Everything one forward pass needs besides the weights and the KV cache.

    Rows are requests; row b holds `query_lens[b]` new tokens (right-padded to S). Token j of
    row b is written to KV-cache index `cache_starts[b] + j` of slot `cache_slots[b]`, and
    attends to every cache index <= that one (prefix entries included).
    """

    input_ids: Tensor  # [B, S] int64, padding arbitrary
    positions: Tensor  # [B, S] int64 position ids (embeddings / RoPE)
    cache_slots: Tensor  # [B] int64 KV slot per row
    cache_starts: Tensor  # [B] int64 cache index of each row's first new token
    query_lens: Tensor  # [B] int64 valid new tokens per row
    kv_len: int  # max over rows of cache_starts + query_lens: the cache length attention reads
    slot_start: int | None  # rows use slots slot_start.. in order (a view, no gather), else None
    padded: bool  # some row has fewer than S valid tokens
    adapters: AdapterBatch = NO_ADAPTERS
    all_logits: bool = False  # logits for every position (echo/logprobs) or the last valid one
    # layer -> ([B] lo, [B] hi): cache indices lo..hi-1 are hidden from that layer's queries
    # (prefix entries of a prefix adapter that leaves the layer out)
    prefix_hidden: Mapping[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @staticmethod
    def build(
        tokens: Sequence[Sequence[int]],
        positions: Sequence[Sequence[int]],
        cache_slots: Sequence[int],
        cache_starts: Sequence[int],
        device: torch.device,
        adapters: AdapterBatch = NO_ADAPTERS,
        all_logits: bool = False,
        prefix_hidden: Mapping[int, tuple[Tensor, Tensor]] | None = None,
    ) -> "ForwardBatch":
        """From host lists: right-pads rows to the longest and derives the host-side facts
        (kv_len, slot_start, padded) once, so that no layer has to sync with the device."""
        lens = [len(t) for t in tokens]
        S = max(lens)
        ids = torch.zeros(len(tokens), S, dtype=torch.long)
        pos = torch.zeros(len(tokens), S, dtype=torch.long)
        for b, (t, p) in enumerate(zip(tokens, positions)):
            ids[b, : len(t)] = torch.tensor(t, dtype=torch.long)
            pos[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        slots = list(cache_slots)
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        return ForwardBatch(
            input_ids=ids.to(device),
            positions=pos.to(device),
            cache_slots=torch.tensor(slots, dtype=torch.long, device=device),
            cache_starts=torch.tensor(list(cache_starts), dtype=torch.long, device=device),
            query_lens=torch.tensor(lens, dtype=torch.long, device=device),
            kv_len=max(s + n for s, n in zip(cache_starts, lens)),
            slot_start=slots[0] if contiguous else None,
            padded=any(n != S for n in lens),
            adapters=adapters,
            all_logits=all_logits,
            prefix_hidden=prefix_hidden or {},
        )

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])
