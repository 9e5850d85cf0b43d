"""Pieces every model family shares: model facts, the slotted KV cache, packed attention,
pre-packed (fused) base linears."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..batch import ForwardBatch


@dataclass(frozen=True)
class ModelInfo:
    """What adapter readers and the engine need to know about the loaded base model."""

    model_type: str  # "gpt2" | "llama" | "mistral" | "qwen2"
    family: str  # "gpt2" | "llama"  (which model file implements it)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    linear_shapes: Mapping[str, tuple[int, int]]  # block-relative module path -> (in, out)
    name: str = ""

    def describe(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "linear_shapes"}


def linear_shapes(block: nn.Module, parts: Sequence[str]) -> dict[str, tuple[int, int]]:
    """`part.name` -> (in, out) of every linear layer directly under the block's `parts`
    (ModelInfo.linear_shapes: the sites a LoRA or (IA)^3 may target)."""
    return {f"{part}.{name}": (m.in_features, m.out_features)
            for part in parts for name, m in getattr(block, part).named_children() if isinstance(m, nn.Linear)}


class KVCache:
    """Fixed slots: per layer one key and one value tensor [slots, n_kv, max_len, head_dim].

    A request owns one slot from admission to finish; its prefix-tuning entries (if any) sit
    at cache indices 0..L-1 and its tokens after them."""

    def __init__(self, info: ModelInfo, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (num_slots, info.num_kv_heads, max_len, info.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(info.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(info.num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return 2 * sum(t.numel() * t.element_size() for t in self.keys)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Cache indices 0..length-1 of slot `src` into slot `dst` (choices sharing a prompt)."""
        for keys, values in zip(self.keys, self.values):
            keys[dst, :, :length] = keys[src, :, :length]
            values[dst, :, :length] = values[src, :, :length]

    def write_prefix(self, slot: int, layer: int, keys: Tensor, values: Tensor) -> None:
        """keys/values [n_kv, L, head_dim] at cache indices 0..L-1 of `slot`."""
        n = keys.shape[1]
        self.keys[layer][slot, :, :n] = keys.to(self.keys[layer].dtype)
        self.values[layer][slot, :, :n] = values.to(self.values[layer].dtype)


# --------------------------------------------------------------------------- attention
@dataclass(frozen=True)
class LayerMasks:
    """Boolean attention masks of one layer, built once per step (True = may attend)."""

    decode: Tensor | None  # [D, 1, 1, T]
    prefill: tuple[Tensor, ...]  # per prefill row [1, 1, n, start + n]


def attention_masks(batch: ForwardBatch, num_layers: int, sliding_window: int | None, max_len: int) -> list[LayerMasks]:
    """Per layer: causal over cache indices (a token at cache index i sees indices <= i, prefix
    entries included), within `sliding_window` if set, minus the prefix entries a row's prefix
    leaves out of that layer. Layers without such entries share one mask object."""
    device = batch.input_ids.device
    D = batch.num_decode

    def build(hidden) -> LayerMasks:
        decode = None
        if D:
            key = batch.decode_keys  # [T]: 0..T-1 (a tensor, so that a compiled step sees T as a size)
            index = batch.decode_index[:, None]  # [D, 1]
            decode = key[None, :] <= index
            if sliding_window is not None:
                decode = decode & (key[None, :] > index - sliding_window)
            if hidden is not None:
                lo, hi = hidden[0][:D, None], hidden[1][:D, None]
                decode = decode & ~((key[None, :] >= lo) & (key[None, :] < hi))
            decode = decode[:, None, None, :]
        prefill = []
        for b, row in enumerate(batch.rows[D:], start=D):
            key = torch.arange(row.start + row.count, device=device)
            index = row.start + torch.arange(row.count, device=device)[:, None]  # [n, 1]
            mask = key[None, :] <= index
            if sliding_window is not None:
                mask = mask & (key[None, :] > index - sliding_window)
            if hidden is not None:
                mask = mask & ~((key >= hidden[0][b]) & (key < hidden[1][b]))[None, :]
            prefill.append(mask[None, None])
        return LayerMasks(decode, tuple(prefill))

    shared = build(None)
    return [build(batch.prefix_hidden[i]) if i in batch.prefix_hidden else shared for i in range(num_layers)]


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, scale: float) -> Tensor:
    """One query per row: q [D, nh, hd], keys/values [D, nkv, T, hd], mask [D, 1, 1, T] -> [D, nh*hd].
    Two small batched matmuls with the query heads grouped by their KV head: for a single query
    this is several times cheaper than the fused CPU attention kernel (README, "How it works")."""
    D, nh, hd = q.shape
    nkv, T = keys.shape[1], keys.shape[2]
    scores = torch.matmul(q.view(D, nkv, nh // nkv, hd), keys.transpose(-1, -2)) * scale  # [D, nkv, g, T]
    scores = scores.masked_fill(~mask.view(D, 1, 1, T), float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), values).reshape(D, nh * hd)


def cached_attention(
    q: Tensor,  # [N, nh, hd]
    k: Tensor,  # [N, nkv, hd]  new keys (already rotated)
    v: Tensor,  # [N, nkv, hd]
    cache_k: Tensor,  # [slots, nkv, max_len, hd]  this layer's cache
    cache_v: Tensor,
    batch: ForwardBatch,
    masks: LayerMasks,
    scale: float,
) -> Tensor:
    """Write the new keys/values into their rows' slots, then attend over each row's slot:
    the decode rows together (one query each), each prefill chunk on its own. -> [N, nh*hd]"""
    N, nh, hd = q.shape
    cache_k[batch.write_slots, :, batch.write_index] = k
    cache_v[batch.write_slots, :, batch.write_index] = v
    gqa = cache_k.shape[1] != nh
    outs = []
    D = batch.num_decode
    if D:
        T = masks.decode.shape[-1]
        if batch.decode_slot_view:  # rows in slots 0..D-1: a view, no copy
            keys, values = cache_k[:D, :, :T], cache_v[:D, :, :T]
        else:
            keys, values = cache_k[batch.decode_slots, :, :T], cache_v[batch.decode_slots, :, :T]
        outs.append(decode_attention(q[:D], keys, values, masks.decode, scale))
    for row, mask in zip(batch.rows[D:], masks.prefill):
        T = row.start + row.count
        qr = q[row.first : row.first + row.count].transpose(0, 1)[None]  # [1, nh, n, hd]
        keys, values = cache_k[row.slot : row.slot + 1, :, :T], cache_v[row.slot : row.slot + 1, :, :T]
        out = F.scaled_dot_product_attention(qr, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)
        outs.append(out[0].transpose(0, 1).reshape(row.count, nh * hd))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


# --------------------------------------------------------------------------- base linears
def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN pre-packed weights: on the CPU (fp32/bf16) they run the step's GEMMs about twice
    as fast as the default BLAS call here (README, "How it works")."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()


@torch.library.custom_op("adapter_server::onednn_linear", mutates_args=())
def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight.T + bias through the oneDNN pre-packed copy that `FusedLinear` attaches to
    `weight` (an opaque tensor torch.compile cannot trace, hence this op)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight.onednn_packed, bias, "none", [], "")


@onednn_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


class FusedLinear:
    """The concatenation of some nn.Linears that read the same input (q|k|v, gate|up), as one
    weight: pre-packed for oneDNN on the CPU, a plain matrix elsewhere. `refresh` rebuilds it in
    place from the modules' current weights (after a merge or reset), so a compiled step that
    reads it stays valid. Returns the parts."""

    def __init__(self, linears: Sequence[nn.Linear], pack: bool, batch_hint: int = 32):
        self.linears, self.pack, self.batch_hint = list(linears), pack, batch_hint
        self.splits = [m.out_features for m in linears]
        self.refresh()

    def refresh(self) -> None:
        linears = self.linears
        weight = torch.cat([m.weight for m in linears]) if len(linears) > 1 else linears[0].weight
        biases = [m.bias for m in linears]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else weight.new_zeros(m.out_features) for b, m in zip(biases, linears)])
        self.weight = weight.detach()
        if self.pack:  # a Python attribute on the plain weight carries the opaque packed copy
            self.weight.onednn_packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, self.batch_hint)

    def __call__(self, x: Tensor) -> list[Tensor]:
        if not self.pack:
            y = F.linear(x, self.weight, self.bias)
        elif torch.compiler.is_compiling():
            y = onednn_linear(x, self.weight, self.bias)
        else:  # eager: skip the custom op's dispatch
            y = torch.ops.mkldnn._linear_pointwise(x, self.weight.onednn_packed, self.bias, "none", [], "")
        return list(y.split(self.splits, dim=-1)) if len(self.splits) > 1 else [y]


class BaseLinear:
    """The base op of one linear site: its pre-packed weight when there is one, else the
    module. `weight`/`bias` stay the module's (DoRA reads them)."""

    def __init__(self, module: nn.Linear, pack: bool):
        self.module = module
        self.fused = FusedLinear([module], pack) if pack else None

    def refresh(self) -> None:
        if self.fused is not None:
            self.fused.refresh()

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    @property
    def bias(self) -> Tensor | None:
        return self.module.bias

    def __call__(self, x: Tensor) -> Tensor:
        return self.module(x) if self.fused is None else self.fused(x)[0]


class Projections(nn.Module):
    """Base class of a block part (attention, MLP) whose linears may be pre-packed and fused:
    `prepack` (re)builds `ops` (one base op per linear) and `fused` (one op per group of
    linears reading the same input) from the modules' current weights."""

    FUSE: tuple[tuple[str, ...], ...] = ()  # groups of linear names that read the same input

    def prepack(self, pack: bool, fuse: bool) -> None:
        ops, fused = self.__dict__.get("ops"), self.__dict__.get("fused")
        if ops is not None and all(op.fused is None or op.fused.pack == pack for op in ops.values()) \
                and bool(fused) == (fuse and bool(self.FUSE)):
            for op in [*ops.values(), *fused.values()]:  # same objects, new weights: compiled steps stay valid
                op.refresh()
            return
        linears = {n: m for n, m in self.named_children() if isinstance(m, nn.Linear)}
        self.ops = {n: BaseLinear(m, pack) for n, m in linears.items()}
        self.fused = {g: FusedLinear([linears[n] for n in g], pack) for g in self.FUSE} if fuse else {}

    def op(self, name: str):
        ops = self.__dict__.get("ops")
        return ops[name] if ops else getattr(self, name)

    def group(self, names: tuple[str, ...]) -> FusedLinear | None:
        fused = self.__dict__.get("fused")
        return fused.get(names) if fused else None


class CausalLM(nn.Module):
    """Base class of a family's causal-LM model: `project_logits` is its LM head's base op, the
    oneDNN pre-packed copy when `prepack` made one. The head is the step's largest GEMM at a
    real vocabulary: at 32,000 tokens x hidden 512, 31 decode rows took 21 ms through
    nn.Linear and 7 ms pre-packed, a prefill's one row 8.9 vs 4.1 ms (2 cores, profiled)."""

    lm_head: nn.Linear

    def project_logits(self, h: Tensor) -> Tensor:  # [M, H] -> [M, V]
        op = self.__dict__.get("head_op")
        return op(h) if op is not None else self.lm_head(h)


def prepack(model: nn.Module, pack: bool | None = None, fuse: bool | None = None) -> None:
    """(Re)build every block part's base ops, and the LM head's, from the current weights
    (after load, merge, reset). Defaults: pre-pack and fuse where oneDNN runs (CPU); elsewhere
    keep the modules (fusing would hold a second copy of the weights on the accelerator)."""
    p = next(model.parameters())
    pack = can_prepack(p.device, p.dtype) if pack is None else pack
    fuse = pack if fuse is None else fuse
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Projections):
                m.prepack(pack, fuse)
        if isinstance(model, CausalLM):
            head = model.__dict__.get("head_op")
            if head is not None and (head.fused is not None) == pack:
                head.refresh()  # same object: a compiled step that reads it stays valid
            else:
                model.__dict__["head_op"] = BaseLinear(model.lm_head, pack)
