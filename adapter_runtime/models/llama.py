"""Llama family: Llama, Mistral, Qwen2 (qkv bias), grouped-query attention, RoPE with the
rope-scaling types of current HF configs, tied or untied embeddings.

Module names equal the HF checkpoint's (`model.layers.0.self_attn.q_proj`, ...), so a
checkpoint loads with no name mapping. Adapter sites are the `adapters.*` calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..batch import ForwardBatch
from .common import CausalLM, KVCache, ModelInfo, Projections, attention_masks, cached_attention, linear_shapes

LLAMA_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class LlamaArgs:
    """What the Llama-family modules read, resolved once from a HF config: the optional
    fields' defaults and the family variants (Qwen2's qkv bias, Mistral's sliding window) are
    decided here and nowhere else."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    sliding_window: int | None
    max_positions: int
    rope_original_max: int  # where the "dynamic" and "longrope" tables start to depend on the length
    name: str

    @classmethod
    def from_hf(cls, c) -> "LlamaArgs":
        heads = c.num_attention_heads
        attention_bias = getattr(c, "attention_bias", False)
        window = getattr(c, "sliding_window", None)
        use_window = getattr(c, "use_sliding_window", True) and c.model_type != "llama"
        return cls(
            model_type=c.model_type, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size, num_layers=c.num_hidden_layers, num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads, rms_norm_eps=c.rms_norm_eps,
            hidden_act=c.hidden_act, qkv_bias=c.model_type == "qwen2" or attention_bias,
            o_bias=attention_bias and c.model_type != "qwen2", mlp_bias=getattr(c, "mlp_bias", False),
            tie_word_embeddings=getattr(c, "tie_word_embeddings", False), sliding_window=window if use_window else None,
            max_positions=c.max_position_embeddings,
            rope_original_max=getattr(c, "original_max_position_embeddings", None) or c.max_position_embeddings,
            name=getattr(c, "name_or_path", "") or "",
        )


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
    longrope, dynamic), so every rope-scaling type a HF config names is computed as HF does
    (those initializers read the HF config itself, which is why it is kept here)."""

    def __init__(self, config, args: LlamaArgs):
        super().__init__()
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        scaling = getattr(config, "rope_scaling", None) or {}
        self.rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        self.config, self.head_dim = config, args.head_dim
        self.init_fn = ROPE_INIT_FUNCTIONS[self.rope_type] if self.rope_type != "default" else None
        inv_freq, self.attention_scaling = self._init(None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.original_max = args.rope_original_max

    def _init(self, seq_len: int | None) -> tuple[Tensor, float]:
        if self.init_fn is None:
            hd = self.head_dim
            inv = 1.0 / (self.config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
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

    def __init__(self, args: LlamaArgs, layer: int):
        super().__init__()
        H = args.hidden_size
        self.layer, self.nh, self.nkv, self.hd = layer, args.num_heads, args.num_kv_heads, args.head_dim
        self.q_proj = nn.Linear(H, self.nh * self.hd, bias=args.qkv_bias)
        self.k_proj = nn.Linear(H, self.nkv * self.hd, bias=args.qkv_bias)
        self.v_proj = nn.Linear(H, self.nkv * self.hd, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, H, bias=args.o_bias)

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

    def __init__(self, args: LlamaArgs, layer: int):
        super().__init__()
        H, I, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.layer = layer
        self.gate_proj = nn.Linear(H, I, bias=bias)
        self.up_proj = nn.Linear(H, I, bias=bias)
        self.down_proj = nn.Linear(I, H, bias=bias)
        from ..methods.bottleneck import activation

        self.act = activation(args.hidden_act)

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
    def __init__(self, args: LlamaArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args, layer)

    def forward(self, h: Tensor, rope, masks, batch: ForwardBatch, cache: KVCache) -> Tensor:
        ad = batch.adapters
        a = self.self_attn(self.input_layernorm(h), rope, masks, batch, cache)
        h = ad.residual(self.layer, "attn", a, h)  # bottleneck site after attention
        f = self.mlp(self.post_attention_layernorm(h), batch)
        h = ad.residual(self.layer, "ffn", f, h)  # bottleneck site after the MLP
        return ad.layer_output(self.layer, h, batch.positions)  # ReFT site: the whole layer's output


class LlamaBody(nn.Module):
    def __init__(self, config, args: LlamaArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary = Rotary(config, args)


class LlamaForCausalLM(CausalLM):
    def __init__(self, config):
        super().__init__()
        self.config = config  # the checkpoint's HF config (the store fingerprints it; RoPE reads it)
        self.args = args = LlamaArgs.from_hf(config)
        self.model = LlamaBody(config, args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.sliding_window = args.sliding_window

    @staticmethod
    def convert_checkpoint(state: dict[str, Tensor]) -> dict[str, Tensor]:
        """HF Llama state dict -> ours: the same names, minus stored rotary tables (recomputed)."""
        return {k: v for k, v in state.items() if "rotary_emb.inv_freq" not in k}

    def after_load(self) -> None:
        """The rotary tables were made on the meta device: compute them for real, in fp32
        whatever the model's dtype (as HF keeps them)."""
        self.model.rotary = Rotary(self.config, self.args).to(next(self.parameters()).device)

    @property
    def info(self) -> ModelInfo:
        a = self.args
        return ModelInfo(
            model_type=a.model_type,
            family="llama",
            hidden_size=a.hidden_size,
            num_layers=a.num_layers,
            num_heads=a.num_heads,
            num_kv_heads=a.num_kv_heads,
            head_dim=a.head_dim,
            intermediate_size=a.intermediate_size,
            vocab_size=a.vocab_size,
            max_positions=a.max_positions,
            linear_shapes=linear_shapes(self.model.layers[0], ("self_attn", "mlp")),
            name=a.name,
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
        return ad.logits(h, self.project_logits)  # flex LM heads of AdapterHub adapters
