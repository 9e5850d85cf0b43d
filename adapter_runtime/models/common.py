"""Pieces every model family shares: model facts, the slotted KV cache, cached attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

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

    def write_prefix(self, slot: int, layer: int, keys: Tensor, values: Tensor) -> None:
        """keys/values [n_kv, L, head_dim] at cache indices 0..L-1 of `slot`."""
        n = keys.shape[1]
        self.keys[layer][slot, :, :n] = keys.to(self.keys[layer].dtype)
        self.values[layer][slot, :, :n] = values.to(self.values[layer].dtype)


def cached_attention(
    q: Tensor,  # [B, nh, S, hd]
    k: Tensor,  # [B, nkv, S, hd]  new keys (already rotated)
    v: Tensor,  # [B, nkv, S, hd]
    cache_k: Tensor,  # [slots, nkv, max_len, hd]  this layer's cache
    cache_v: Tensor,
    batch: ForwardBatch,
    scale: float,
    layer: int,
    sliding_window: int | None = None,
) -> Tensor:
    """Write the new keys/values into each row's slot, then attend over the slot's cache.

    Token j of row b sits at cache index i = cache_starts[b] + j and sees every cache index
    <= i (prefix entries included), within `sliding_window` if set. Returns [B, S, nh*hd]."""
    B, nh, S, hd = q.shape
    index = batch.cache_starts[:, None] + torch.arange(S, device=q.device)  # [B, S]
    rows = batch.cache_slots[:, None].expand(B, S)  # [B, S]
    if batch.padded:  # write valid tokens only: padding must not land in another token's place
        valid = torch.arange(S, device=q.device)[None, :] < batch.query_lens[:, None]
        rows, index_w = rows[valid], index[valid]
        cache_k[rows, :, index_w] = k.transpose(1, 2)[valid]
        cache_v[rows, :, index_w] = v.transpose(1, 2)[valid]
    else:
        cache_k[rows, :, index] = k.transpose(1, 2)  # [B, S, nkv, hd]
        cache_v[rows, :, index] = v.transpose(1, 2)

    T = batch.kv_len
    if batch.slot_start is not None:  # contiguous slots: a view, no copy
        keys = cache_k[batch.slot_start : batch.slot_start + B, :, :T]
        values = cache_v[batch.slot_start : batch.slot_start + B, :, :T]
    else:
        keys = cache_k[batch.cache_slots, :, :T]
        values = cache_v[batch.cache_slots, :, :T]

    key_index = torch.arange(T, device=q.device)
    mask = key_index[None, None, :] <= index[:, :, None]  # [B, S, T] causal over cache indices
    if sliding_window is not None:
        mask = mask & (key_index[None, None, :] > index[:, :, None] - sliding_window)
    if (hidden := batch.prefix_hidden.get(layer)) is not None:  # prefix left out of this layer
        lo, hi = hidden
        mask = mask & ~((key_index >= lo[:, None, None]) & (key_index < hi[:, None, None]))
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask[:, None], scale=scale, enable_gqa=keys.shape[1] != nh
    )  # [B, nh, S, hd]
    return out.transpose(1, 2).reshape(B, S, nh * hd)


def last_token_hidden(h: Tensor, batch: ForwardBatch) -> Tensor:
    """[B, S, H] -> [B, 1, H]: each row's last valid token (the one that predicts the next)."""
    if not batch.padded:
        return h[:, -1:]
    return h[torch.arange(h.shape[0], device=h.device), batch.query_lens - 1][:, None]
