"""Llama family: Llama, Mistral, Qwen2 (qkv bias), grouped-query attention, RoPE with the
rope-scaling types of current HF configs, tied or untied embeddings.

Module names equal the HF checkpoint's (`model.layers.0.self_attn.q_proj`, ...), so a
checkpoint loads with no name mapping. Adapter sites are the `adapters.*` calls.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..batch import ForwardBatch
from .common import KVCache, ModelInfo, Projections, attention_masks, cached_attention

LLAMA_TYPES = ("llama", "mistral", "qwen2")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype  # normalize in fp32 like HF, then scale in the input dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Rotary(nn.Module):
    """cos/sin tables from transformers' own rope initializers (default, linear, llama3, yarn,
    longrope, dynamic), so every rope-scaling type a HF config names is computed as HF does."""

    def __init__(self, config):
        super().__init__()
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        scaling = getattr(config, "rope_scaling", None) or {}
        self.rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        self.config = config
        self.init_fn = ROPE_INIT_FUNCTIONS[self.rope_type] if self.rope_type != "default" else None
        inv_freq, self.attention_scaling = self._init(None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.original_max = getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings

    def _init(self, seq_len: int | None) -> tuple[Tensor, float]:
        if self.init_fn is None:
            head_dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
            base = self.config.rope_theta
            inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
            return inv, 1.0
        return self.init_fn(self.config, None, seq_len=seq_len) if seq_len else self.init_fn(self.config, None)

    def forward(self, positions: Tensor, kv_len: int) -> tuple[Tensor, Tensor]:
        inv_freq, scaling = self.inv_freq, self.attention_scaling
        if self.rope_type in ("dynamic", "longrope") and kv_len > self.original_max:
            inv_freq, scaling = self._init(kv_len)  # these types depend on the sequence length
            inv_freq = inv_freq.to(positions.device)
        freqs = positions[..., None].float() * inv_freq.float()  # [N, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * scaling, emb.sin() * scaling  # [N, hd] each (fp32)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [N, heads, hd]; cos/sin [N, hd]: HF's rotate_half convention."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(Projections):
    FUSE = (("q_proj", "k_proj", "v_proj"),)

    def __init__(self, config, layer: int):
        super().__init__()
        H = config.hidden_size
        self.layer = layer
        self.nh = config.num_attention_heads
        self.nkv = getattr(config, "num_key_value_heads", None) or self.nh
        self.hd = getattr(config, "head_dim", None) or H // self.nh
        qkv_bias = config.model_type == "qwen2" or getattr(config, "attention_bias", False)
        o_bias = getattr(config, "attention_bias", False) and config.model_type != "qwen2"
        self.q_proj = nn.Linear(H, self.nh * self.hd, bias=qkv_bias)
        self.k_proj = nn.Linear(H, self.nkv * self.hd, bias=qkv_bias)
        self.v_proj = nn.Linear(H, self.nkv * self.hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, H, bias=o_bias)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], masks, batch: ForwardBatch, cache: KVCache) -> Tensor:
        N = x.shape[0]
        ad, i = batch.adapters, self.layer
        names = ("q_proj", "k_proj", "v_proj")
        fused = self.group(names)
        if fused is not None and ad.plain(i, [f"self_attn.{n}" for n in names]):  # one GEMM for q|k|v
            q, k, v = (ad.linear_output(i, f"self_attn.{n}", x, y) for n, y in zip(names, fused(x)))
        else:
            q, k, v = (ad.linear(i, f"self_attn.{n}", self.op(n), x) for n in names)
        q = rotate(q.view(N, self.nh, self.hd), *rope)  # [N, nh, hd]
        k = rotate(k.view(N, self.nkv, self.hd), *rope)  # prefix keys in the cache stay unrotated
        out = cached_attention(q, k, v.view(N, self.nkv, self.hd), cache.keys[i], cache.values[i], batch, masks,
                               self.hd**-0.5)  # [N, nh*hd]
        return ad.linear(i, "self_attn.o_proj", self.op("o_proj"), out)


class MLP(Projections):
    FUSE = (("gate_proj", "up_proj"),)

    def __init__(self, config, layer: int):
        super().__init__()
        H, I = config.hidden_size, config.intermediate_size
        bias = getattr(config, "mlp_bias", False)
        self.layer = layer
        self.gate_proj = nn.Linear(H, I, bias=bias)
        self.up_proj = nn.Linear(H, I, bias=bias)
        self.down_proj = nn.Linear(I, H, bias=bias)
        from ..methods.bottleneck import activation

        self.act = activation(config.hidden_act)

    def forward(self, x: Tensor, batch: ForwardBatch) -> Tensor:
        ad, i = batch.adapters, self.layer
        names = ("gate_proj", "up_proj")
        fused = self.group(names)
        if fused is not None and ad.plain(i, [f"mlp.{n}" for n in names]):
            gate, up = (ad.linear_output(i, f"mlp.{n}", x, y) for n, y in zip(names, fused(x)))
        else:
            gate, up = (ad.linear(i, f"mlp.{n}", self.op(n), x) for n in names)  # [N, I]
        return ad.linear(i, "mlp.down_proj", self.op("down_proj"), self.act(gate) * up)  # [N, H]


class DecoderLayer(nn.Module):
    def __init__(self, config, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, layer)

    def forward(self, h: Tensor, rope, masks, batch: ForwardBatch, cache: KVCache) -> Tensor:
        ad = batch.adapters
        a = self.self_attn(self.input_layernorm(h), rope, masks, batch, cache)
        h = ad.residual(self.layer, "attn", a, h)  # bottleneck site after attention
        f = self.mlp(self.post_attention_layernorm(h), batch)
        h = ad.residual(self.layer, "ffn", f, h)  # bottleneck site after the MLP
        return ad.layer_output(self.layer, h, batch.positions)  # ReFT site: the whole layer's output


class LlamaBody(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = LlamaBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
        window = getattr(config, "sliding_window", None)
        use_window = getattr(config, "use_sliding_window", True) and config.model_type != "llama"
        self.sliding_window = window if use_window else None

    @property
    def info(self) -> ModelInfo:
        c, attn = self.config, self.model.layers[0].self_attn
        return ModelInfo(
            model_type=c.model_type,
            family="llama",
            hidden_size=c.hidden_size,
            num_layers=c.num_hidden_layers,
            num_heads=attn.nh,
            num_kv_heads=attn.nkv,
            head_dim=attn.hd,
            intermediate_size=c.intermediate_size,
            vocab_size=c.vocab_size,
            max_positions=c.max_position_embeddings,
            linear_shapes={
                f"{part}.{name}": (m.in_features, m.out_features)
                for part in ("self_attn", "mlp")
                for name, m in getattr(self.model.layers[0], part).named_children()
                if isinstance(m, nn.Linear)
            },
            name=getattr(c, "name_or_path", "") or "",
        )

    def forward(self, batch: ForwardBatch, cache: KVCache) -> Tensor:
        """Logits [M, V] of the tokens in batch.logits_index (each row's last, or all of a row's)."""
        ad = batch.adapters
        h = ad.token_embeddings(self.model.embed_tokens(batch.input_ids))  # [N, H]
        h = ad.embeddings(h)  # invertible adapters hook the embedding output
        rope = self.model.rotary(batch.positions, batch.kv_len)
        masks = attention_masks(batch, len(self.model.layers), self.sliding_window, cache.max_len)  # once per step
        for layer, layer_masks in zip(self.model.layers, masks):
            h = layer(h, rope, layer_masks, batch, cache)
        h = self.model.norm(h[batch.logits_index])  # [M, H]
        return ad.logits(h, self.lm_head)  # flex LM heads of AdapterHub adapters
