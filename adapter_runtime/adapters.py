"""The normalized, in-memory form of one adapter, whatever format it came from.

A format reader (`formats/`) turns a saved AdapterHub or PEFT directory into an `Adapter`:
plain tensors keyed by the *site* they act on. The model never sees formats; it asks the
`AdapterBatch` (batch.py) at each site, which calls the pure math in `methods/`.

Sites (see DESIGN.md):
  linear      (layer, module)   module is the HF path inside a block, e.g. "self_attn.q_proj",
                                "mlp.down_proj", "attn.c_attn", "mlp.c_fc"
  bottleneck  (layer, location) location is "attn" (after attention) or "ffn" (after the MLP)
  invertible  once, on the embedding output
  prefix      extra KV entries in every attention layer, written once at admission
  prompt      extra input embeddings before layer 0
  layer       (layer)           the hidden state after a whole decoder layer, at chosen token
                                positions (ReFT interventions)

An AdapterFusion layer (`Fusion`) is stored and named like an adapter, but it only acts inside
a Fuse composition of the bottleneck adapters it fuses (composition.py, methods/compose.py).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Mapping

import torch
from torch import Tensor

# --------------------------------------------------------------------------- linear sites


@dataclass(frozen=True)
class LoRA:
    """Additive low-rank delta on a linear output: y += scale * ((x @ A.T) @ B.T + bias).

    With `gate` (AdapterHub gated LoRA, UniPELT) the scale is replaced, per row and per output
    block, by mean_over_tokens(sigmoid(x @ gate_weight.T + gate_bias)).
    With `magnitude` (PEFT DoRA) the output is renormalized per output row:
    y = m / ||W + scale B A||_row * (x W.T + scale (x A.T) B.T) + b   (methods/lora.py).
    """

    A: Tensor  # [r, in]
    B: Tensor  # [out, r]
    scale: float
    bias: Tensor | None = None  # [out]  PEFT lora_bias (scaled by `scale` too)
    gate_weight: Tensor | None = None  # [blocks, in]  output split into `blocks` equal parts
    gate_bias: Tensor | None = None  # [blocks]
    magnitude: Tensor | None = None  # [out]  DoRA's lora_magnitude_vector


@dataclass(frozen=True)
class Scale:
    """(IA)^3: elementwise scale of a linear's output (bias included) or of its input.

    on_input=False: y = base(x) * vector          vector [out]
    on_input=True:  y = base(x * vector)          vector [in]   (PEFT feed-forward modules)
    """

    vector: Tensor
    on_input: bool = False


LinearEffect = LoRA | Scale

# --------------------------------------------------------------------------- residual sites


@dataclass(frozen=True)
class Bottleneck:
    """One bottleneck adapter at one location, PHM layers already materialized to dense.

    Reference loop (AdapterHub 1.3.0, reference §3.1), with s = sublayer output, r = residual:
        sequential: ares = s if residual_before_ln else x;  x = s + r if original_ln_before else s
                    up = U(act(D(LN_before(x)))) * scaling * gate(x)
                    out = LN_after(up + ares)   (or LN_after(up) + ares)
                    h = out + r if original_ln_after else out
        parallel:   up = U(act(D(LN_before(r)))) * scaling * gate(r);  h = LN_after(up) + s (+ r)
    """

    down_weight: Tensor  # [d, H]  (nn.Linear convention)
    down_bias: Tensor | None  # [d]
    up_weight: Tensor  # [H, d]
    up_bias: Tensor | None  # [H]
    activation: str  # name understood by methods.bottleneck.activation()
    scaling: float | Tensor  # float, learned [1], or channel [H]
    residual_before_ln: bool = True
    adapter_residual_before_ln: bool = False
    original_ln_before: bool = True
    original_ln_after: bool = True
    is_parallel: bool = False
    ln_before: tuple[Tensor, Tensor] | None = None  # (weight [H], bias [H]), eps 1e-5
    ln_after: tuple[Tensor, Tensor] | None = None
    gate: tuple[Tensor, Tensor] | None = None  # (weight [1, H], bias [1])


# --------------------------------------------------------------------------- embedding sites


@dataclass(frozen=True)
class Invertible:
    """NICE coupling on the embedding output: y1 = x1 + F(x2); y2 = x2 + G(y1).

    F = Linear(f0) -> act -> Linear(f2), G likewise; x1 = x[..., :H//2], x2 = x[..., H//2:].
    """

    f0_weight: Tensor
    f0_bias: Tensor
    f2_weight: Tensor
    f2_bias: Tensor
    g0_weight: Tensor
    g0_bias: Tensor
    g2_weight: Tensor
    g2_bias: Tensor
    activation: str


@dataclass(frozen=True)
class Prefix:
    """Extra key/value entries per attention layer, already flat (any MLP evaluated at load).

    keys[layer] / values[layer]: [n_kv_heads, L, head_dim], post-RoPE (prefix keys carry no
    rotary embedding). Layers left out have no entry. `shifts_positions`: PEFT prefix tuning
    numbers the real tokens from L; AdapterHub keeps 0..S-1.
    """

    keys: Mapping[int, Tensor]
    values: Mapping[int, Tensor]
    length: int
    shifts_positions: bool


@dataclass(frozen=True)
class Prompt:
    """Soft prompt: `embeddings` [n, H] replace the token embeddings of n virtual tokens that
    precede the real ones; they take positions 0..n-1 like any token (PEFT semantics)."""

    embeddings: Tensor  # [n, H]

    @property
    def length(self) -> int:
        return int(self.embeddings.shape[0])


@dataclass(frozen=True)
class LMHead:
    """A flex causal-LM head saved with an AdapterHub `*AdapterModel` adapter. Its last layer
    is tied to the base embeddings; what the adapter adds is the layers before it, the
    projection's own bias, and the inverse of the setup's invertible adapter (reference §3.3):
        z = layers(ln_f(h));  z = NICE^-1(z);  logits = z @ E.T + bias
    `layers`: ("linear", weight [E, H], bias [E]) | ("act", name) | ("ln", weight, bias, eps)."""

    layers: tuple
    bias: Tensor | None  # [V]


# --------------------------------------------------------------------------- layer outputs


@dataclass(frozen=True)
class ReftUnit:
    """One ReFT intervention on hidden states x [n, H] (adapters 1.3.0 `ReftUnit`, eval mode):
        source = act(x @ source_weight.T + source_bias)            [n, r]
        source = source - x @ projection.T   if subtract_projection
        out    = x + source @ projection                           [n, H]
    `projection` [r, H] is the effective weight (an orthogonal parametrization evaluated at load)."""

    source_weight: Tensor  # [r, H]
    source_bias: Tensor  # [r]
    projection: Tensor  # [r, H]
    subtract_projection: bool
    activation: str | None  # None: identity


@dataclass(frozen=True)
class Reft:
    """ReFT (LoReFT, NoReFT, DiReFT) after whole decoder layers, at the first `prefix_positions`
    and the last `suffix_positions` tokens of the sequence the forward sees (methods/reft.py).
    units[layer] = (prefix unit, suffix unit), or (one unit,) when `tied`."""

    units: Mapping[int, tuple[ReftUnit, ...]]
    prefix_positions: int
    suffix_positions: int
    tied: bool


# --------------------------------------------------------------------------- fusion layers


@dataclass(frozen=True)
class FusionLayer:
    """AdapterFusion at one bottleneck location (adapters 1.3.0 `BertFusion`): attention of a
    query over the fused adapters' up-projections. Absent projections are identities."""

    query: tuple[Tensor, Tensor] | None  # (weight [H, H], bias [H])
    key: tuple[Tensor, Tensor] | None
    value: Tensor | None  # weight [H, H], no bias


@dataclass(frozen=True)
class Fusion:
    """A fusion saved by `save_adapter_fusion`: the adapters it was made for, one layer per
    (layer, location) and the config flags of its forward (methods/fusion.py)."""

    adapter_names: tuple[str, ...]
    layers: Mapping[tuple[int, str], FusionLayer]
    query_before_ln: bool
    residual_before: bool
    value_before_softmax: bool


# --------------------------------------------------------------------------- the adapter


@dataclass(frozen=True)
class Adapter:
    name: str
    format: str  # "adapterhub" | "peft"
    method: str  # human-readable: "lora", "ia3", "bottleneck", "prefix_tuning", "union", ...
    config: Mapping  # the adapter_config.json as read, for display and export
    linear: Mapping[tuple[int, str], LinearEffect] = field(default_factory=dict)
    bottleneck: Mapping[tuple[int, str], Bottleneck] = field(default_factory=dict)
    invertible: Invertible | None = None
    prefix: Prefix | None = None
    prompt: Prompt | None = None
    head: LMHead | None = None
    reft: Reft | None = None
    fusion: Fusion | None = None  # a stored fusion: no effect of its own (see the module docstring)
    # content identity: the store's hash of the adapter's files, or a fresh id for an object
    # built in-process. Whatever is keyed per adapter (the merged adapter, device banks) uses
    # it, never `name`: a name can be deleted and taken by other weights at any time.
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def tensors(self) -> list[Tensor]:
        return list(_iter_tensors(self))

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Adapter":
        """A copy with every tensor moved (and cast, for floating tensors)."""
        return _map_tensors(self, lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))


def _iter_tensors(obj):
    if isinstance(obj, Tensor):
        yield obj
    elif is_dataclass(obj):
        for f in fields(obj):
            if f.name != "config":
                yield from _iter_tensors(getattr(obj, f.name))
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _iter_tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _iter_tensors(v)


def _map_tensors(obj, fn):
    if isinstance(obj, Tensor):
        return fn(obj)
    if is_dataclass(obj):
        return replace(obj, **{f.name: _map_tensors(getattr(obj, f.name), fn) for f in fields(obj) if f.name != "config"})
    if isinstance(obj, Mapping):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_map_tensors(v, fn) for v in obj)
    return obj
