"""Per-step batch metadata: one frozen `ForwardBatch` is passed down through the model.

Tokens are *packed*: the step's rows (requests) put their new tokens one after the other,
[N] in all, so linear layers run on [N, H] whatever mix of one-token decode rows and
multi-token prefill chunks the step holds. Decode rows come first (token i = row i).

Adapters are data (banks.py): at each adapter site the model calls the step's `AdapterStep`,
which applies every banked method by per-token slot index (slot 0 = no adapter: exact
identity). Rows whose setup no bank can hold (stacks, composition blocks, gated or DoRA LoRAs,
flex heads, ReFT, the undo of a merged adapter) are *side groups*, applied after the banks by
the reference math of methods/ one group at a time (compositions: methods/compose.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Hashable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from .adapters import Adapter, LinearEffect, LoRA, Scale
from .methods import bottleneck as bottleneck_math
from .methods import compose as compose_math
from .methods import head as head_math
from .methods import invertible as invertible_math
from .methods import lora as lora_math
from .methods import prompt as prompt_math
from .methods import reft as reft_math
from .methods import stack as stack_math

Setup = tuple[Adapter, ...]  # adapters of one request, in Stack order (usually one); compose.Composed for blocks


@dataclass(frozen=True)
class SideGroup:
    """The tokens of one step whose rows share a setup that takes the side path."""

    setup: Setup
    tokens: Tensor  # [n] token indices into the step
    segments: Tensor | None  # [n] row of each token within the group; None: one token per row
    logit_rows: Tensor | None  # indices into the step's logits rows that belong to the group

    @property
    def block(self) -> compose_math.Block | None:
        """The composition tree, for rows whose setup is a composition block."""
        return getattr(self.setup, "block", None)

    @property
    def first(self) -> Adapter:
        """The setup's first leaf: its NICE and its ReFT are the ones that run (§7.2.2)."""
        return self.block.first() if self.block is not None else self.setup[0]

    def _adapters(self):
        return self.block.leaves() if self.block is not None else self.setup

    def linear_effects(self, site) -> list[LinearEffect]:
        return [e for a in self._adapters() if (e := a.linear.get(site)) is not None]

    def bottlenecks(self, site) -> list:
        return [b for a in self._adapters() if (b := a.bottleneck.get(site)) is not None]


@dataclass(frozen=True)
class Unmerge:
    """While an adapter is merged into the base weights: the tokens of rows that do not use it,
    and per linear site the effect that takes the merged output back to the base output."""

    tokens: Tensor  # [n]
    effects: Mapping[tuple[int, str], LinearEffect]


@dataclass(frozen=True)
class MergedAdapter:
    """An adapter whose linear effects are folded into the base weights (see merge.py)."""

    adapter: Adapter
    residue: Adapter  # the adapter without its linear effects: what its rows still run
    inverse_effects: Mapping[tuple[int, str], LinearEffect]


def without_linear(adapter: Adapter) -> Adapter:
    """The part of a merged adapter that still runs per row (a union's bottleneck, say)."""
    return replace(adapter, linear={})


def same_adapter(a: Adapter, b: Adapter) -> bool:
    """By identity (uid) when both carry one, else by name: the registry may hand out another
    copy of the same adapter."""
    ua, ub = getattr(a, "uid", None), getattr(b, "uid", None)
    return ua == ub if ua and ub else a.name == b.name


def _put(dst: Tensor, tokens: Tensor, value: Tensor, shared: Tensor | None) -> Tensor:
    """dst with dst[tokens] = value; copies first when dst is `shared` (an input other sites read)."""
    if dst is shared:
        dst = dst.clone()
    dst[tokens] = value
    return dst


@dataclass(frozen=True)
class AdapterStep:
    """What the model asks at each adapter site during one step."""

    banks: object | None = None  # banks.AdapterBanks
    slots: Mapping[tuple[str, Hashable], Tensor] | None = None  # (kind, route) -> [N] bank slot of each token
    groups: tuple | None = None  # None: gather weights per token; else ((slot, tokens [k]), ...) per used slot
    active: Mapping[str, frozenset] = field(default_factory=dict)  # bank kind -> sites to apply
    side: tuple[SideGroup, ...] = ()
    unmerge: Unmerge | None = None
    prompts: tuple[tuple[Tensor, Tensor], ...] = ()  # (tokens [k], vectors [k, H]) of soft prompts
    memo: dict | None = None  # DoRA factors per (adapter, site), kept by the runner across steps

    def _on(self, kind: str, site) -> bool:
        return site in self.active.get(kind, ())

    def _slots(self, kind: str, site) -> Tensor:
        """[N] each token's slot in the `kind` bank at `site` (0 where its adapter has nothing there)."""
        return self.slots[(kind, self.banks[kind].route(site))]

    def static_safe(self) -> bool:
        return not self.side and self.unmerge is None and not self.prompts

    # ---- linear sites: LoRA deltas, (IA)^3 scales
    def plain(self, layer: int, modules: Sequence[str]) -> bool:
        """No input-side effect at any of these linears: their base ops may run as one fused
        matmul on the shared input."""
        if self.unmerge is not None and any((layer, m) in self.unmerge.effects for m in modules):
            return False
        if any(self._on("ia3", ((layer, m), True)) for m in modules):
            return False
        return not any(g.linear_effects((layer, m)) for g in self.side for m in modules)

    def linear(self, layer: int, module: str, base: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """base(x) [N, out] with every token's effects at (layer, module).

        Reference, per token with adapter setup e: y = stack.apply_output(x, base(stack.scale_input(x, e)), e)."""
        site = (layer, module)
        undo = self.unmerge.effects.get(site) if self.unmerge is not None else None
        x_in = x  # x feeds other sites: never scale it in place
        if undo is not None and isinstance(undo, Scale) and undo.on_input:
            t = self.unmerge.tokens
            x_in = _put(x_in, t, stack_math.scale_input(x_in[t], [undo]), x)
        if self._on("ia3", (site, True)):
            x_in = self.banks["ia3"].scale(site, True, x_in, self._slots("ia3", (site, True)))
        for g in self.side:
            effects = g.linear_effects(site)
            if any(isinstance(e, Scale) and e.on_input for e in effects):
                x_in = _put(x_in, g.tokens, stack_math.scale_input(x_in[g.tokens], effects), x)
        y = base(x_in)
        if undo is not None:  # back to the base output first, then the rows' own effects
            t = self.unmerge.tokens
            y = _put(y, t, stack_math.apply_output(x_in[t], y[t], [undo], None), None)
        return self.linear_output(layer, module, x, y, base)

    def linear_output(self, layer: int, module: str, x: Tensor, y: Tensor, base=None) -> Tensor:
        """The output-side effects at (layer, module) on y = base(x) (no input-side effect here)."""
        site = (layer, module)
        if self._on("ia3", (site, False)):
            y = self.banks["ia3"].scale(site, False, y, self._slots("ia3", (site, False)))
        if self._on("lora", site):
            y = self.banks["lora"].output(site, x, y, self._slots("lora", site), self.groups)
        for g in self.side:
            effects = g.linear_effects(site)
            if not effects:
                continue
            t = g.tokens
            if g.block is not None:
                y = _put(y, t, compose_math.linear_output(g.block, site, x[t], y[t], g.segments), None)
            elif isinstance(dora := effects[0], LoRA) and dora.magnitude is not None:  # alone: stacks refuse PEFT
                ratio, bias = self._dora_ratio(site, base, dora)
                y = _put(y, t, lora_math.dora_output(x[t], y[t], dora, ratio, bias), None)
            else:
                y = _put(y, t, stack_math.apply_output(x[t], y[t], effects, g.segments), None)
        return y

    def _dora_ratio(self, site, base, dora: LoRA):
        """DoRA's per-row factor from the *original* base weight (a merged adapter's delta is
        taken back out first); memoized by the runner until the weights change."""
        key = ("dora", site, id(dora))
        memo = self.memo if self.memo is not None else {}
        if key not in memo:
            weight, bias = base.weight, base.bias
            undo = self.unmerge.effects.get(site) if self.unmerge is not None else None
            if undo is not None:
                from .methods.merge import merged_weights

                weight, bias = merged_weights(undo, weight, bias)
            memo[key] = (lora_math.dora_ratio(dora, weight), bias, dora)  # keeps `dora` alive: its id stays unique
        return memo[key][:2]

    # ---- residual sites: bottleneck adapters around a sublayer
    def residual(self, layer: int, location: str, sublayer_out: Tensor, residual: Tensor) -> Tensor:
        """The block's new hidden state [N, H]: sublayer_out + residual, or the adapters' composition.

        Reference, per token with bottlenecks b at the site: bottleneck.compose(b, s, r)."""
        site = (layer, location)
        h = None
        if self._on("bottleneck", site):
            h = self.banks["bottleneck"].residual(site, sublayer_out, residual, self._slots("bottleneck", site),
                                                       self.groups)
        if h is None:
            h = sublayer_out + residual
        for g in self.side:
            if bns := g.bottlenecks(site):
                t = g.tokens
                if g.block is not None:
                    out = compose_math.location(g.block, site, sublayer_out[t], residual[t], g.segments)
                else:
                    out = bottleneck_math.compose(bns, sublayer_out[t], residual[t], g.segments)
                h = _put(h, t, out, None)
        return h

    # ---- layer outputs: ReFT interventions at chosen positions
    def layer_output(self, layer: int, h: Tensor, positions: Tensor) -> Tensor:
        """The hidden state after decoder layer `layer` [N, H], with the ReFT interventions of
        each side group whose first leaf is a ReFT adapter. `positions` [N]: each token's index
        in its row (AdapterHub rows: the position ids); a row's length is its last token's + 1
        (a ReFT row's step always ends at its newest token: layout.RowLayout.recompute).

        Reference, per row of length L: reft.intervene (methods/reft.py)."""
        for g in self.side:
            reft = g.first.reft
            if reft is None or layer not in reft.units:
                continue
            t = g.tokens
            pos = positions[t]
            if g.segments is None:  # one token per row
                lengths = pos + 1
            else:
                last = torch.zeros(int(g.segments.max()) + 1, dtype=pos.dtype, device=pos.device)
                lengths = last.scatter_reduce(0, g.segments, pos, "amax")[g.segments] + 1
            h = _put(h, t, reft_math.intervene(reft, layer, h[t], pos, lengths), None)
        return h

    # ---- embedding sites
    def token_embeddings(self, h: Tensor) -> Tensor:
        """Soft-prompt vectors over the placeholder embeddings of the virtual tokens."""
        return prompt_math.place(h, self.prompts) if self.prompts else h

    def embeddings(self, h: Tensor) -> Tensor:
        """Invertible (NICE) adapters on the embedding output [N, H]."""
        if self._on("invertible", "embeddings"):
            h = self.banks["invertible"].embeddings(h, self._slots("invertible", "embeddings"), self.groups)
        for g in self.side:
            if (inv := g.first.invertible) is not None:
                h = _put(h, g.tokens, invertible_math.forward(inv, h[g.tokens]), None)
        return h

    def logits(self, h: Tensor, project: Callable[[Tensor], Tensor]) -> Tensor:
        """project(h) [M, V] for the rows to score; rows whose setup carries a flex LM head (the
        last adapter that has one) first go through its layers and, if the setup's first
        adapter is invertible, the NICE inverse, and get the head's bias added."""
        if not self.side:
            return project(h)
        heads = [(g, head) for g in self.side if g.logit_rows is not None
                 and (head := next((a.head for a in reversed(g.setup) if a.head), None))]
        for g, head in heads:
            z = head_math.transform(head, h[g.logit_rows])
            if (inv := g.first.invertible) is not None:
                z = invertible_math.inverse(inv, z)
            h = _put(h, g.logit_rows, z, None)
        logits = project(h)
        for g, head in heads:
            if head.bias is not None:
                logits[g.logit_rows] = logits[g.logit_rows] + head.bias
        return logits


NO_ADAPTERS = AdapterStep()


def banked_adapter(setup: Setup, bankable: Callable[[Adapter], bool]) -> Adapter | None:
    """The one adapter a row's setup consists of, if the banks can hold it (`bankable`); None
    for no adapter, stacks and composition blocks."""
    if len(setup) != 1 or getattr(setup, "block", None) is not None or not bankable(setup[0]):
        return None
    return setup[0]


class RowSpan(NamedTuple):
    """Host facts of one row: its tokens are first..first+count-1; they go to KV slot `slot` at
    cache indices start..start+count-1 and see every cache index up to their own."""

    first: int
    count: int
    slot: int
    start: int


@dataclass(frozen=True)
class ForwardBatch:
    """Everything one forward pass needs besides the weights and the KV cache."""

    input_ids: Tensor  # [N] int64
    positions: Tensor  # [N] int64 position ids (embeddings / RoPE)
    write_slots: Tensor  # [N] int64 KV slot of each token
    write_index: Tensor  # [N] int64 cache index of each token
    rows: tuple[RowSpan, ...]  # host: rows[:num_decode] are the one-token decode rows
    num_decode: int
    decode_slots: Tensor  # [D] int64 KV slot of each decode row
    decode_index: Tensor  # [D] int64 cache index of each decode row's token
    decode_keys: Tensor  # [T] 0..T-1: the cache indices decode rows read (max index + 1, maybe rounded up)
    decode_slot_view: bool  # decode rows use slots 0..D-1 in order: read the cache as a view
    kv_len: int  # the longest row's cache length (dynamic RoPE types need it)
    logits_index: Tensor  # [M] tokens whose logits the forward returns
    adapters: AdapterStep = NO_ADAPTERS
    # layer -> ([R] lo, [R] hi): cache indices lo..hi-1 are hidden from that layer's queries
    # (prefix entries of a prefix adapter that leaves the layer out), per row
    prefix_hidden: Mapping[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @staticmethod
    def build(
        tokens: Sequence[Sequence[int]],
        positions: Sequence[Sequence[int]],
        cache_slots: Sequence[int],
        cache_starts: Sequence[int],
        device: torch.device | str,
        adapters: AdapterStep = NO_ADAPTERS,
        all_logits: bool | Sequence[bool] = False,
        prefix_hidden: Mapping[int, tuple[Tensor, Tensor]] | None = None,
        kv_round: int = 1,
        read_slots: Sequence[int] | None = None,
        max_kv: int | None = None,
    ) -> "ForwardBatch":
        """From host lists, one entry per row (rows with one token first, if any). Derives the
        host-side facts once, so that no layer has to sync with the device. `all_logits`: per
        row (or for all), logits for every token rather than the last one only. `read_slots`:
        the KV slot each decode row reads, if not the one it writes (padding rows of a static
        step write to a scratch slot and read any)."""
        device = torch.device(device)
        R = len(tokens)
        lens = [len(t) for t in tokens]
        D = 0
        while D < R and lens[D] == 1:
            D += 1
        if D < R and any(n == 1 for n in lens[D:]):  # keep one-token rows (decode) in front
            raise ValueError("one-token rows must come first")
        flags = [all_logits] * R if isinstance(all_logits, bool) else list(all_logits)
        rows, first, logit_tokens = [], 0, []
        for t, slot, start, every in zip(tokens, cache_slots, cache_starts, flags):
            rows.append(RowSpan(first, len(t), int(slot), int(start)))
            logit_tokens += list(range(first, first + len(t))) if every else [first + len(t) - 1]
            first += len(t)
        flat = lambda xs: torch.tensor([v for x in xs for v in x], dtype=torch.long)  # noqa: E731
        write_index = [r.start + j for r in rows for j in range(r.count)]
        decode_slots = list(read_slots[:D]) if read_slots is not None else [r.slot for r in rows[:D]]
        kv = max((r.start + 1 for r in rows[:D]), default=0)
        kv = min(-(-kv // kv_round) * kv_round, max_kv or kv) if D else 0
        host = {
            "input_ids": flat(tokens), "positions": flat(positions),
            "write_slots": torch.tensor([r.slot for r in rows for _ in range(r.count)], dtype=torch.long),
            "write_index": torch.tensor(write_index, dtype=torch.long),
            "decode_slots": torch.tensor(decode_slots, dtype=torch.long),
            "decode_index": torch.tensor(write_index[:D], dtype=torch.long),
            "logits_index": torch.tensor(logit_tokens, dtype=torch.long),
            "decode_keys": torch.arange(kv),
        }
        return ForwardBatch(
            **{k: v.to(device) for k, v in host.items()},
            rows=tuple(rows), num_decode=D, decode_slot_view=decode_slots == list(range(D)),
            kv_len=max(r.start + r.count for r in rows), adapters=adapters, prefix_hidden=prefix_hidden or {},
        )

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_rows(self) -> int:
        return len(self.rows)


def routed_slots(banks, active: Mapping[str, frozenset], row_slots: list[int], counts: list[int],
                 device) -> dict[tuple[str, Hashable], Tensor]:
    """(kind, route) -> [N] each token's slot, 0 (the identity) for a row whose adapter has
    nothing in that kind at that route's sites. The result is the same (an adapter's empty
    site holds the identity, as slot 0), but those rows all read slot 0's weights, which stay
    in cache, instead of their own slots' zeros: in a mixed batch most rows lack most kinds
    (one slot per kind would make every row read every kind's weights from memory)."""
    out = {}
    for kind, sites in active.items():
        bank = banks[kind]
        for route in sorted({bank.route(site) for site in sites}, key=repr):  # a fixed order: one graph
            uses = {s: s != 0 and bank.uses(s, route) for s in set(row_slots)}
            out[(kind, route)] = torch.tensor([s if uses[s] else 0 for s, n in zip(row_slots, counts) for _ in range(n)],
                                              device=device, dtype=torch.long)
    return out


GATHER_MAX_TOKENS = 64  # up to this many tokens, banked weights are gathered per token; above, per slot


def build_adapter_step(
    setups: Sequence[Setup],
    counts: Sequence[int],
    device: torch.device | str,
    banks=None,
    merged: MergedAdapter | None = None,
    static: bool = False,
    gather: bool | None = None,
    memo: dict | None = None,
    done: Sequence[int] | None = None,
    logit_rows: Sequence[Sequence[int]] | None = None,
) -> AdapterStep:
    """The adapter part of a step whose row b has `counts[b]` packed tokens and setup `setups[b]`.

    Rows whose setup is one bankable adapter (banks.bankable) get its bank slot; others (stacks,
    gated/DoRA LoRAs, flex heads, or every row when `banks` is None) form side groups by setup.
    With `merged` (an adapter folded into the base weights), rows using it run its residue and
    every other row gets the merged delta undone at each merged site. `done[b]`: the row's tokens
    (virtual ones included) computed before this chunk, to place soft prompts; `logit_rows[b]`:
    the rows of the step's logits that belong to row b (for flex heads)."""
    device = torch.device(device)
    N = sum(counts)
    firsts = [sum(counts[:b]) for b in range(len(counts))]
    token_lists = [list(range(f, f + n)) for f, n in zip(firsts, counts)]
    unmerge = None
    if merged is not None:
        # only a row of the merged adapter alone runs on the merged weights (plus its residue); a
        # stack or composition holding it composes its effects with others' (a stacked LoRA reads
        # the previous output, an Average scales it): those rows undo the merge like any other row
        using = [banked_adapter(setup, lambda a: True) is not None and same_adapter(setup[0], merged.adapter)
                 for setup in setups]
        setups = [(merged.residue,) if uses else setup for setup, uses in zip(setups, using)]
        others = [t for b, uses in enumerate(using) if not uses for t in token_lists[b]]
        if others:
            unmerge = Unmerge(torch.tensor(others, device=device, dtype=torch.long), merged.inverse_effects)
    row_slots = [0] * len(setups)
    side_rows: dict[tuple, list[int]] = {}
    for b, setup in enumerate(setups):
        block = getattr(setup, "block", None)
        if not setup or block is None and all(not (a.linear or a.bottleneck or a.invertible or a.head or a.reft)
                                              for a in setup):
            continue  # nothing per token (none, or only prefix/prompt)
        if banks is not None and banked_adapter(setup, banks.bankable) is not None:
            row_slots[b] = -1  # filled below, once every slot of the step is known to be in use
        else:
            key = ("composed", block.key) if block is not None else tuple(id(a) for a in setup)
            side_rows.setdefault(key, []).append(b)
    if banks is not None:
        in_use: list[int] = []
        for b, setup in enumerate(setups):
            if row_slots[b] == -1:
                row_slots[b] = banks.slot(setup[0], in_use)
                in_use.append(row_slots[b])
    side = []
    for rows in side_rows.values():
        tokens = [t for b in rows for t in token_lists[b]]
        segments = None
        if any(counts[b] != 1 for b in rows):
            segments = torch.tensor([k for k, b in enumerate(rows) for _ in range(counts[b])], device=device)
        logits = None
        if logit_rows is not None:
            logits = torch.tensor([m for b in rows for m in logit_rows[b]], device=device, dtype=torch.long)
        side.append(SideGroup(setups[rows[0]], torch.tensor(tokens, device=device, dtype=torch.long), segments, logits))
    prompts = []
    for b, setup in enumerate(setups):
        vectors = prompt_math.vectors(setup)
        start = done[b] if done is not None else 0
        if vectors is not None and start < vectors.shape[0]:
            n = min(vectors.shape[0] - start, counts[b])
            prompts.append((torch.arange(firsts[b], firsts[b] + n, device=device), vectors[start : start + n]))
    slots = active = groups = None
    if banks is not None and any(row_slots):
        token_slots = [s for s, n in zip(row_slots, counts) for _ in range(n)]
        active = banks.active(row_slots, static)
        slots = routed_slots(banks, active, row_slots, counts, device)
        gather = N <= GATHER_MAX_TOKENS if gather is None else gather
        if not gather:
            by_slot: dict[int, list[int]] = {}
            for t, s in enumerate(token_slots):
                if s:
                    by_slot.setdefault(s, []).append(t)
            groups = tuple((s, torch.tensor(ts, device=device, dtype=torch.long)) for s, ts in by_slot.items())
    return AdapterStep(banks=banks if slots is not None else None, slots=slots, groups=groups, active=active or {},
                       side=tuple(side), unmerge=unmerge, prompts=tuple(prompts), memo=memo)
