"""GPT-2: learned absolute positions, pre-LN blocks, fused q|k|v projection (`attn.c_attn`).

HF stores GPT-2's projections as Conv1D, weight [in, out]; we hold them as nn.Linear, weight
[out, in], transposed once at load (`CONV1D_WEIGHTS`). Adapter sites keep HF module names.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..batch import ForwardBatch
from .common import CausalLM, KVCache, ModelInfo, Projections, attention_masks, cached_attention, linear_shapes

# checkpoint keys (suffixes) whose tensors are Conv1D [in, out] and are transposed at load
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass(frozen=True)
class GPT2Args:
    """What the GPT-2 modules read, resolved once from a HF config (optional fields' defaults
    decided here and nowhere else)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    inner_size: int
    layer_norm_eps: float
    activation: str
    scale_attn_weights: bool
    scale_attn_by_inverse_layer_idx: bool
    max_positions: int
    tie_word_embeddings: bool
    name: str

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, c) -> "GPT2Args":
        return cls(
            vocab_size=c.vocab_size, hidden_size=c.n_embd, num_layers=c.n_layer, num_heads=c.n_head,
            inner_size=c.n_inner or 4 * c.n_embd, layer_norm_eps=c.layer_norm_epsilon, activation=c.activation_function,
            scale_attn_weights=c.scale_attn_weights,
            scale_attn_by_inverse_layer_idx=getattr(c, "scale_attn_by_inverse_layer_idx", False),
            max_positions=c.n_positions, tie_word_embeddings=getattr(c, "tie_word_embeddings", True),
            name=getattr(c, "name_or_path", "") or "",
        )


class Attention(Projections):
    def __init__(self, args: GPT2Args, layer: int):
        super().__init__()
        H = args.hidden_size
        self.layer, self.nh, self.hd = layer, args.num_heads, args.head_dim
        self.c_attn = nn.Linear(H, 3 * H)
        self.c_proj = nn.Linear(H, H)
        scale = self.hd**-0.5 if args.scale_attn_weights else 1.0
        if args.scale_attn_by_inverse_layer_idx:
            scale /= layer + 1
        self.scale = scale

    def forward(self, x: Tensor, masks, batch: ForwardBatch, cache: KVCache) -> Tensor:
        N, H = x.shape
        ad, i = batch.adapters, self.layer
        qkv = ad.linear(i, "attn.c_attn", self.op("c_attn"), x)  # [N, 3H]
        q, k, v = (t.view(N, self.nh, self.hd) for t in qkv.split(H, dim=-1))
        out = cached_attention(q, k, v, cache.keys[i], cache.values[i], batch, masks, self.scale)  # [N, H]
        return ad.linear(i, "attn.c_proj", self.op("c_proj"), out)


class MLP(Projections):
    def __init__(self, args: GPT2Args, layer: int):
        super().__init__()
        H, inner = args.hidden_size, args.inner_size
        self.layer = layer
        self.c_fc = nn.Linear(H, inner)
        self.c_proj = nn.Linear(inner, H)
        from ..methods.bottleneck import activation

        self.act = activation(args.activation)

    def forward(self, x: Tensor, batch: ForwardBatch) -> Tensor:
        ad, i = batch.adapters, self.layer
        f = self.act(ad.linear(i, "mlp.c_fc", self.op("c_fc"), x))  # [N, 4H]
        return ad.linear(i, "mlp.c_proj", self.op("c_proj"), f)  # [N, H]


class Block(nn.Module):
    def __init__(self, args: GPT2Args, layer: int):
        super().__init__()
        self.layer = layer
        self.ln_1 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.attn = Attention(args, layer)
        self.ln_2 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.mlp = MLP(args, layer)

    def forward(self, h: Tensor, masks, batch: ForwardBatch, cache: KVCache) -> Tensor:
        ad = batch.adapters
        a = self.attn(self.ln_1(h), masks, batch, cache)
        h = ad.residual(self.layer, "attn", a, h)  # bottleneck site after attention
        f = self.mlp(self.ln_2(h), batch)
        h = ad.residual(self.layer, "ffn", f, h)  # bottleneck site after the MLP
        return ad.layer_output(self.layer, h, batch.positions)  # ReFT site: the whole layer's output


class GPT2Body(nn.Module):
    def __init__(self, args: GPT2Args):
        super().__init__()
        self.wte = nn.Embedding(args.vocab_size, args.hidden_size)
        self.wpe = nn.Embedding(args.max_positions, args.hidden_size)
        self.h = nn.ModuleList(Block(args, i) for i in range(args.num_layers))
        self.ln_f = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)


class GPT2LMHeadModel(CausalLM):
    def __init__(self, config):
        super().__init__()
        self.config = config  # the checkpoint's HF config (the store fingerprints it)
        self.args = args = GPT2Args.from_hf(config)
        self.transformer = GPT2Body(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def after_load(self) -> None:
        """Nothing is computed at load for GPT-2 (learned positions)."""

    @staticmethod
    def convert_checkpoint(state: dict[str, Tensor]) -> dict[str, Tensor]:
        """HF GPT-2 state dict -> ours: transpose Conv1D weights, drop mask buffers, accept
        bare `GPT2Model` keys (no `transformer.` prefix)."""
        out = {}
        for key, t in state.items():
            if key.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            if not key.startswith(("transformer.", "lm_head.")):
                key = "transformer." + key
            out[key] = t.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else t
        return out

    @property
    def info(self) -> ModelInfo:
        a = self.args
        return ModelInfo(
            model_type="gpt2",
            family="gpt2",
            hidden_size=a.hidden_size,
            num_layers=a.num_layers,
            num_heads=a.num_heads,
            num_kv_heads=a.num_heads,
            head_dim=a.head_dim,
            intermediate_size=a.inner_size,
            vocab_size=a.vocab_size,
            max_positions=a.max_positions,
            linear_shapes=linear_shapes(self.transformer.h[0], ("attn", "mlp")),
            name=a.name,
        )

    def forward(self, batch: ForwardBatch, cache: KVCache) -> Tensor:
        """Logits [M, V] of the tokens in batch.logits_index (each row's last, or all of a row's)."""
        ad, t = batch.adapters, self.transformer
        h = ad.token_embeddings(t.wte(batch.input_ids)) + t.wpe(batch.positions)  # [N, H]
        h = ad.embeddings(h)  # invertible adapters see wte + wpe (a hook on `drop`)
        masks = attention_masks(batch, len(t.h), None, cache.max_len)  # once per step
        for block, layer_masks in zip(t.h, masks):
            h = block(h, layer_masks, batch, cache)
        h = t.ln_f(h[batch.logits_index])  # [M, H]
        return ad.logits(h, self.project_logits)  # flex LM heads of AdapterHub adapters
