"""GPT-2: learned absolute positions, pre-LN blocks, fused q|k|v projection (`attn.c_attn`).

HF stores GPT-2's projections as Conv1D, weight [in, out]; we hold them as nn.Linear, weight
[out, in], transposed once at load (`CONV1D_WEIGHTS`). Adapter sites keep HF module names.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..batch import ForwardBatch
from .common import KVCache, ModelInfo, Projections, attention_masks, cached_attention

# checkpoint keys (suffixes) whose tensors are Conv1D [in, out] and are transposed at load
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class Attention(Projections):
    def __init__(self, config, layer: int):
        super().__init__()
        H = config.n_embd
        self.layer, self.nh, self.hd = layer, config.n_head, H // config.n_head
        self.c_attn = nn.Linear(H, 3 * H)
        self.c_proj = nn.Linear(H, H)
        scale = self.hd**-0.5 if config.scale_attn_weights else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
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
    def __init__(self, config, layer: int):
        super().__init__()
        H = config.n_embd
        inner = config.n_inner or 4 * H
        self.layer = layer
        self.c_fc = nn.Linear(H, inner)
        self.c_proj = nn.Linear(inner, H)
        from ..methods.bottleneck import activation

        self.act = activation(config.activation_function)

    def forward(self, x: Tensor, batch: ForwardBatch) -> Tensor:
        ad, i = batch.adapters, self.layer
        f = self.act(ad.linear(i, "mlp.c_fc", self.op("c_fc"), x))  # [N, 4H]
        return ad.linear(i, "mlp.c_proj", self.op("c_proj"), f)  # [N, H]


class Block(nn.Module):
    def __init__(self, config, layer: int):
        super().__init__()
        self.layer = layer
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config, layer)

    def forward(self, h: Tensor, masks, batch: ForwardBatch, cache: KVCache) -> Tensor:
        ad = batch.adapters
        a = self.attn(self.ln_1(h), masks, batch, cache)
        h = ad.residual(self.layer, "attn", a, h)  # bottleneck site after attention
        f = self.mlp(self.ln_2(h), batch)
        h = ad.residual(self.layer, "ffn", f, h)  # bottleneck site after the MLP
        return ad.layer_output(self.layer, h, batch.positions)  # ReFT site: the whole layer's output


class GPT2Body(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Body(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.weight = self.transformer.wte.weight

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
        c = self.config
        block = self.transformer.h[0]
        return ModelInfo(
            model_type="gpt2",
            family="gpt2",
            hidden_size=c.n_embd,
            num_layers=c.n_layer,
            num_heads=c.n_head,
            num_kv_heads=c.n_head,
            head_dim=c.n_embd // c.n_head,
            intermediate_size=block.mlp.c_fc.out_features,
            vocab_size=c.vocab_size,
            max_positions=c.n_positions,
            linear_shapes={
                f"{part}.{name}": (m.in_features, m.out_features)
                for part in ("attn", "mlp")
                for name, m in getattr(block, part).named_children()
                if isinstance(m, nn.Linear)
            },
            name=getattr(c, "name_or_path", "") or "",
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
        return ad.logits(h, self.lm_head)  # flex LM heads of AdapterHub adapters
