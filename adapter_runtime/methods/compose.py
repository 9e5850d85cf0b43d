"""Composition blocks, evaluated per row: Stack, Average, Fuse, Parallel, BatchSplit, MultiTask
(AdapterHub `adapters` 1.3.0, reference §7 and §8).

A request's composition becomes one `Block` tree per row of the batch. Parallel, BatchSplit
and MultiTask split the *rows* (a Parallel's channel is a row of its own; BatchSplit and
MultiTask route the request's prompts), so a row's tree records, per splitting block, the
`chosen` child it runs; every other rule of the library (which adapter pre-processes, which
one post-processes, the 1/N averaging) is kept, so a row equals its rows of the library's
batch. The side path of batch.py evaluates these functions on the row's tokens.

Reference loop (§7.6), bottleneck location with s = sublayer output, r = residual:
    location(setup, s, r):
        if no leaf of the setup has a module here: return s + r
        v, _, last = compose(setup, v=s, ares=r)
        return post(last, v, s, r)
    compose(Stack):     for child: block -> compose(child); name with a module here ->
                            x, ares = pre(child, v); v = fwd(child, x, ares); last = child
    compose(Average):   x, a = pre(first leaf, v); outs = [fwd(c, x, a) | compose(c, x, a)] for
                        children present; v = sum_k w_k out_k / N  (one out only: out * sum(w) / N);
                        last = the last out's last
    compose(Parallel | BatchSplit):  x, a = pre(first leaf, v); the row's child on (x, a);
                        last = the last *child's* last (for every row)
    compose(MultiTask): as BatchSplit, but the first leaf's pre-processing runs twice (the
                        library's compose_multi_task calls pre_block, then compose_batch_split again)
    compose(Fuse):      x, q, a = pre(last leaf, v) (q: the query, before or after the residual by
                        query_before_ln); ups = [up-projection of each present child on x];
                        v = fusion(q, ups, a); last = the last leaf
LoRA / (IA)^3 linear, y = base(x):  v = compose(setup, v=None) with
    f_LoRA(v) = s * ((x if v is None else v) A^T B^T),  f_IA3(v) = alpha*b * (1 if v is None else v)
    Stack applies the f's in order; Average gives sum_k w_k f_k(v_in) / N (one out: * sum(w)/N);
    a split block applies its row's child; the output is y + v, or y * v when the library's
    last adapter (as above) is an (IA)^3.
Invertible (NICE) and ReFT: the first leaf of the whole setup only, for every row.

Which trees are valid (the library's nesting rules, and the combinations it fails on) is
decided in adapter_runtime/composition.py before a tree reaches this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..adapters import Adapter, LoRA
from . import bottleneck as bottleneck_math
from .fusion import fuse
from .lora import lora_delta

STACK, AVERAGE, FUSE, PARALLEL, BATCH_SPLIT, MULTI_TASK = "stack", "average", "fuse", "parallel", "batch_split", "multi_task"
SPLITS = (PARALLEL, BATCH_SPLIT, MULTI_TASK)  # blocks that route rows: a row runs one child


@dataclass(frozen=True, eq=False)
class Block:
    """One composition block of a row's setup; children are `Adapter`s or `Block`s."""

    kind: str
    children: tuple
    weights: tuple[float, ...] = ()  # AVERAGE: as the library holds them (normalized unless told not to)
    fusion: Adapter | None = None  # FUSE: the stored fusion, whose `.fusion` holds the layers
    chosen: int = 0  # SPLITS: the child this row runs

    def first(self) -> Adapter:
        c = self.children[0]
        return c.first() if isinstance(c, Block) else c

    def last(self) -> Adapter:
        c = self.children[-1]
        return c.last() if isinstance(c, Block) else c

    def leaves(self) -> list[Adapter]:
        """Every adapter of the tree, depth first (all children of split blocks)."""
        return [a for c in self.children for a in (c.leaves() if isinstance(c, Block) else [c])]

    def path(self) -> list[Adapter]:
        """The adapters this row runs, in order: split blocks contribute their chosen child only."""
        children = (self.children[self.chosen],) if self.kind in SPLITS else self.children
        return [a for c in children for a in (c.path() if isinstance(c, Block) else [c])]

    def blocks(self) -> list["Block"]:
        """This block and every block below it."""
        return [self, *(b for c in self.children if isinstance(c, Block) for b in c.blocks())]

    @property
    def key(self) -> tuple:
        """Structural identity (adapter objects by id): rows with equal keys compute alike."""
        return (self.kind, self.chosen, self.weights, id(self.fusion),
                tuple(c.key if isinstance(c, Block) else id(c) for c in self.children))


class Composed(tuple):
    """A row whose setup is a composition: as a tuple, the adapters it runs (`Block.path`, in
    Stack order: what prefix entries, positions and the request's layout see); `block` the tree
    the side path evaluates; `pinned` every adapter the row holds (all children, fusions)."""

    def __new__(cls, block: Block):
        row = super().__new__(cls, block.path())
        row.block = block
        row.pinned = tuple(block.leaves()) + tuple(b.fusion for b in block.blocks() if b.fusion is not None)
        return row

    def __getnewargs__(self):
        return (self.block,)


# --------------------------------------------------------------------------- bottleneck locations


class _State(NamedTuple):
    v: Tensor  # the running hidden state
    ares: Tensor  # the adapter residual of the last pre-processing
    up: Tensor | None  # the last adapter's up-projection (what a Fuse attends over)
    last: Adapter | None  # the adapter whose post-processing ends the location


def _present(a: Adapter, site) -> bool:
    return a.bottleneck.get(site) is not None


def location(block: Block, site, s: Tensor, r: Tensor, segments: Tensor | None) -> Tensor:
    """The hidden state after bottleneck location `site` (layer, "attn" | "ffn") for the row's
    tokens: s = sublayer output, r = residual, [n, H] each."""
    if not any(_present(a, site) for a in block.leaves()):
        return s + r
    st = _compose(block, site, _State(s, r, None, None), r, segments)
    return bottleneck_math.post(st.last.bottleneck[site], st.v, s, r)


def _single(a: Adapter, site, x: Tensor, ares: Tensor, segments) -> _State:
    b = a.bottleneck[site]
    up = bottleneck_math.up_projection(b, x)
    return _State(bottleneck_math.forward(b, x, ares, segments, up), ares, up, a)


def _compose(node: Block, site, st: _State, r: Tensor, segments) -> _State:
    if node.kind == STACK:
        for c in node.children:
            if isinstance(c, Block):
                st = _compose(c, site, st, r, segments)
            elif _present(c, site):
                x, ares = bottleneck_math.pre(c.bottleneck[site], st.v, r)
                st = _single(c, site, x, ares, segments)
        return st
    if node.kind == FUSE:
        return _fuse(node, site, st, r, segments)
    x, ares = bottleneck_math.pre(node.first().bottleneck[site], st.v, r)
    if node.kind == MULTI_TASK:
        x, ares = bottleneck_math.pre(node.first().bottleneck[site], x, r)
    inner = _State(x, ares, st.up, st.last)
    if node.kind == AVERAGE:
        outs = [_compose(c, site, inner, r, segments) if isinstance(c, Block) else _single(c, site, x, ares, segments)
                for c in node.children if isinstance(c, Block) or _present(c, site)]
        v = _mean([o.v for o in outs], node.weights)
        return _State(v, outs[0].ares, outs[0].up, outs[-1].last)
    c = node.children[node.chosen]
    out = _compose(c, site, inner, r, segments) if isinstance(c, Block) else _single(c, site, x, ares, segments)
    return out._replace(last=_last(node.children[-1], site, st.last))


def _fuse(node: Block, site, st: _State, r: Tensor, segments) -> _State:
    last = node.last()
    b = last.bottleneck[site]
    fusion = node.fusion.fusion
    x, ares = bottleneck_math.pre(b, st.v, r)
    if b.is_parallel:
        query = r
    else:
        query = st.v if fusion.query_before_ln else x
    inner = _State(x, ares, st.up, st.last)
    ups = [_compose(c, site, inner, r, segments).up if isinstance(c, Block) else bottleneck_math.up_projection(
        c.bottleneck[site], x) for c in node.children if isinstance(c, Block) or _present(c, site)]
    v = fuse(fusion, fusion.layers[site], query, torch.stack(ups, dim=1), ares)
    return _State(v, ares, st.up, last)


def _last(node, site, incoming: Adapter | None) -> Adapter | None:
    """The `last` adapter the library's state carries after `node` (without computing it)."""
    if not isinstance(node, Block):
        return node if _present(node, site) else incoming
    if node.kind == FUSE:
        return node.last()
    if node.kind == STACK:
        for c in node.children:
            incoming = _last(c, site, incoming)
        return incoming
    if node.kind == AVERAGE:
        outs = [c for c in node.children if isinstance(c, Block) or _present(c, site)]
        return _last(outs[-1], site, incoming)
    return _last(node.children[-1], site, incoming)


def _mean(outs: list, weights: tuple[float, ...]):
    """The library's `mean(stack(outs) * weights, dim=0)` over N = len(weights) weights: with one
    out it is broadcast against all of them."""
    n = len(weights)
    if len(outs) == 1:
        return outs[0] * (sum(weights) / n)
    return sum(w * o for w, o in zip(weights, outs)) / n


# --------------------------------------------------------------------------- linear sites


def linear_output(block: Block, site, x: Tensor, y: Tensor, segments: Tensor | None) -> Tensor:
    """y = base(x) [n, out] with the row's LoRA / (IA)^3 composition at `site` (layer, module)."""
    v, last = _linear(block, site, x, None, None, segments)
    if last is None:
        return y
    return y + v if isinstance(last.linear[site], LoRA) else y * v


def _effect(a: Adapter, site, x: Tensor, v, segments):
    e = a.linear[site]
    if isinstance(e, LoRA):
        return lora_delta(e, x if v is None else v, x, segments)
    return e.vector if v is None else v * e.vector


def _linear(node: Block, site, x: Tensor, v, last, segments):
    if node.kind == STACK:
        for c in node.children:
            if isinstance(c, Block):
                v, last = _linear(c, site, x, v, last, segments)
            elif site in c.linear:
                v, last = _effect(c, site, x, v, segments), c
        return v, last
    if node.kind == AVERAGE:
        outs = [_linear(c, site, x, v, last, segments) if isinstance(c, Block) else (_effect(c, site, x, v, segments), c)
                for c in node.children if isinstance(c, Block) or site in c.linear]
        return _mean([o[0] for o in outs], node.weights), outs[-1][1]
    c = node.children[node.chosen]  # splits (a Fuse holds no linear effects: composition.py)
    v_c, last_c = _linear(c, site, x, v, last, segments) if isinstance(c, Block) else (_effect(c, site, x, v, segments), c)
    return v_c, _linear_last(node.children[-1], site, last)


def _linear_last(node, site, incoming):
    if not isinstance(node, Block):
        return node if site in node.linear else incoming
    if node.kind == STACK:
        for c in node.children:
            incoming = _linear_last(c, site, incoming)
        return incoming
    if node.kind == AVERAGE:
        outs = [c for c in node.children if isinstance(c, Block) or site in c.linear]
        return _linear_last(outs[-1], site, incoming)
    return _linear_last(node.children[-1], site, incoming)
