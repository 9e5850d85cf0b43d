"""Bottleneck adapters (Pfeiffer, Houlsby, parallel, any BnConfig; Compacter after PHM
materialization) at one residual site, alone or stacked (AdapterHub reference §3.1, §7.2.1).

Reference loop at one location, s = sublayer output, r = residual before the sublayer:
    v = s
    for a in stack:
        parallel:   x = ares = r              (earlier adapters' v is discarded)
        sequential: x = v + r if a.original_ln_before else v
                    ares = v if a.residual_before_ln is True else x
        v = forward(a, x, ares)
    last parallel:   h = v + s (+ r if original_ln_after)
    last sequential: h = v + r if original_ln_after else v

Bank: per location the down/up weights and biases, the scaling as a [H] vector, the LayerNorms,
the activation (a code into the site's names) and the five flags of every adapter, one slot
each (bottleneck widths zero-padded to the widest: the padded up-columns are zero). One
gathered pass computes every token's adapter; `torch.where` on the flags picks, per token, what
the branchy reference would compute, and tokens whose slot has no adapter here keep s + r.
Gated adapters (a mean over the chunk's tokens) take the side path.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..adapters import Adapter, Bottleneck
from . import materialized, token_mean

LN_EPS = 1e-5  # adapter LayerNorms are nn.LayerNorm(H) with the default eps, on Llama too


@lru_cache(maxsize=None)
def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The library's activation lookup: transformers' ACT2FN by lower-cased name, and
    "leakyrelu" as F.leaky_relu (slope 0.01)."""
    from transformers.activations import get_activation

    name = name.lower()
    if name == "leakyrelu":
        return F.leaky_relu
    return get_activation(name)


def _layer_norm(x: Tensor, params: tuple[Tensor, Tensor] | None) -> Tensor:
    if params is None:
        return x
    weight, bias = params
    return F.layer_norm(x, (x.shape[-1],), weight, bias, LN_EPS)


def up_projection(a: Bottleneck, x: Tensor) -> Tensor:
    """U(act(D(LN_before(x)))) * scaling   [n, H]: what an AdapterFusion attends over."""
    z = F.linear(_layer_norm(x, a.ln_before), a.down_weight, a.down_bias)
    return F.linear(activation(a.activation)(z), a.up_weight, a.up_bias) * a.scaling


def branch(a: Bottleneck, x: Tensor, segments: Tensor | None, up: Tensor | None = None) -> Tensor:
    """u(x) = U(act(D(LN_before(x)))) * scaling * gate(x)   [n, H] (`up`: the first factors, if known)"""
    up = up_projection(a, x) if up is None else up
    if a.gate is not None:  # gate reads the pre-LN input; mean over the row's tokens in this forward
        up = up * token_mean(torch.sigmoid(F.linear(x, *a.gate)), segments)
    return up


def forward(a: Bottleneck, x: Tensor, ares: Tensor, segments: Tensor | None, up: Tensor | None = None) -> Tensor:
    """One adapter's output before the block's post-processing (§3.1 steps 2-5)."""
    out = branch(a, x, segments, up)
    if a.is_parallel:
        return _layer_norm(out, a.ln_after)
    if a.adapter_residual_before_ln:
        out = out + ares
    out = _layer_norm(out, a.ln_after)
    if not a.adapter_residual_before_ln:
        out = out + ares
    return out


def pre(a: Bottleneck, v: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """(x, ares): the adapter's input and adapter residual from the running value v (§7.2.1 step 1)."""
    if a.is_parallel:
        return r, r
    x = v + r if a.original_ln_before else v
    return x, (v if a.residual_before_ln is True else x)


def post(a: Bottleneck, v: Tensor, s: Tensor, r: Tensor) -> Tensor:
    """The last adapter's post-processing: the block's hidden state (§7.2.1 step 3)."""
    if a.is_parallel:
        return v + s + r if a.original_ln_after else v + s
    return v + r if a.original_ln_after else v


def compose(stack: Sequence[Bottleneck], s: Tensor, r: Tensor, segments: Tensor | None) -> Tensor:
    """The block's hidden state after the location: see the module docstring."""
    v = s
    for a in stack:
        x, ares = pre(a, v, r)
        v = forward(a, x, ares, segments)
    return post(stack[-1], v, s, r)


def phm_weight(rule: Tensor, W: Tensor) -> Tensor:
    """Compacter's PHM matrix sum_i kron(rule[i], W[i]) -> [in, out] (used as x @ H, no transpose).

    rule [n, n, n], W [n, in/n, out/n]."""
    return sum(torch.kron(rule[i], W[i]) for i in range(rule.shape[0]))


# --------------------------------------------------------------------------- bank
FLAGS = ("is_parallel", "original_ln_before", "residual_before_ln", "adapter_residual_before_ln", "original_ln_after")
COLUMN = {name: i for i, name in enumerate((*FLAGS, "present", "ln_before", "ln_after"))}  # a site's flag table


def _banked_layer_norm(t: Tensor, params: Tensor) -> Tensor:
    """F.layer_norm with a per-token affine (params [n, 2, H]: weight, bias)."""
    return F.layer_norm(t, (t.shape[-1],), None, None, LN_EPS) * params[:, 0] + params[:, 1]


def banked_activation(activations: tuple[str, ...], codes: Tensor, z: Tensor) -> Tensor:
    """Each token's own activation of z [n, d]: activations[codes[i]] for token i."""
    a = activation(activations[0])(z)
    for code, name in enumerate(activations[1:], 1):
        a = torch.where(codes[:, None] == code, activation(name)(z), a)
    return a


def banked_mlp(w: dict, first: str, second: str, activations: tuple[str, ...], codes: Tensor, x: Tensor,
               slots: Tensor) -> Tensor:
    """second(act(first(x))) per token with its slot's weights (the bottleneck's down/up, the
    invertible coupling's F and G): w[first] [C, d, in], w[second] [C, out, d], their biases under
    name + "_bias"; x [n, in] -> [n, out]. Both products' inputs are stored first: inlined into
    the per-token matrix-vector product, each would be recomputed once per output element (the
    invertible site: ~1.2 -> ~0.2 ms of a step, replayed)."""
    z = torch.bmm(w[first][slots], materialized(x)[:, :, None])[:, :, 0] + w[first + "_bias"][slots]  # [n, d]
    a = materialized(banked_activation(activations, codes, z))
    return torch.bmm(w[second][slots], a[:, :, None])[:, :, 0] + w[second + "_bias"][slots]


def banked_compose(w: dict, activations: tuple[str, ...], s: Tensor, r: Tensor, slots: Tensor) -> Tensor:
    """compose([a_i], s_i, r_i) for every token i at once, a_i = the adapter in slot slots[i];
    s, r [n, H] -> h [n, H]; tokens whose slot holds no adapter get s + r."""
    table = w["flags"][slots]  # [n, columns] bool: one gather for every flag

    def flag(name: str) -> Tensor:  # [n, 1]
        return table[:, COLUMN[name], None]

    par = flag("is_parallel")
    x_seq = torch.where(flag("original_ln_before"), s + r, s)
    x = torch.where(par, r, x_seq)
    ares = torch.where(par, r, torch.where(flag("residual_before_ln"), s, x_seq))
    if "ln_before" in w:
        x = torch.where(flag("ln_before"), _banked_layer_norm(x, w["ln_before"][slots]), x)
    up = banked_mlp(w, "down", "up", activations, w["activation"][slots], x, slots) * w["scaling"][slots]
    residual_first = flag("adapter_residual_before_ln") & ~par
    t = torch.where(residual_first, up + ares, up)
    if "ln_after" in w:
        t = torch.where(flag("ln_after"), _banked_layer_norm(t, w["ln_after"][slots]), t)
    out = torch.where(residual_first | par, t, t + ares)
    keep_r = flag("original_ln_after")
    h = torch.where(par, torch.where(keep_r, out + s + r, out + s), torch.where(keep_r, out + r, out))
    return torch.where(flag("present"), h, s + r)


class BottleneckBank:
    """Per site one table of every slot's adapter, whatever its activation and width: a step
    runs one gathered pass per site (a pass per activation cost the mixed batch ~40 % more,
    profiled), and each site is a handful of tensors (each is a guard of the compiled step)."""

    kind = "bottleneck"

    def __init__(self, info, capacity: int, device: torch.device, dtype: torch.dtype):
        self.info, self.capacity, self.device, self.dtype = info, capacity, device, dtype
        self.sites: dict[tuple[int, str], dict] = {}  # (layer, location) -> tensors
        self.activations: dict[tuple[int, str], tuple[str, ...]] = {}  # site -> names, by activation code
        self.held: dict[int, dict] = {}  # slot -> {(layer, location): Bottleneck}

    @staticmethod
    def accepts(adapter: Adapter) -> bool:
        return all(b.gate is None for b in adapter.bottleneck.values())

    def signature(self) -> tuple:
        return tuple(sorted((site, tuple(w["down"].shape), self.activations[site], "ln_before" in w, "ln_after" in w)
                            for site, w in self.sites.items()))

    def _tensors(self, site, d: int, H: int, ln_before: bool, ln_after: bool) -> dict:
        w = self.sites.get(site)
        C, kw = self.capacity, {"device": self.device, "dtype": self.dtype}
        if w is None or w["down"].shape[1] < d:  # new, or wider: grow (zero padding is exact)
            grown = {"down": torch.zeros(C, d, H, **kw), "down_bias": torch.zeros(C, d, **kw),
                     "up": torch.zeros(C, H, d, **kw), "up_bias": torch.zeros(C, H, **kw),
                     "scaling": torch.ones(C, H, **kw), "activation": torch.zeros(C, dtype=torch.long, device=self.device),
                     "flags": torch.zeros(C, len(COLUMN), dtype=torch.bool, device=self.device)}
            if w is not None:
                old = w["down"].shape[1]
                grown["down"][:, :old], grown["down_bias"][:, :old], grown["up"][:, :, :old] = \
                    w["down"], w["down_bias"], w["up"]
                grown.update({name: value for name, value in w.items() if name not in ("down", "down_bias", "up")})
            w = self.sites[site] = grown
        for name, needed in (("ln_before", ln_before), ("ln_after", ln_after)):
            if needed and name not in w:
                w[name] = torch.stack([torch.ones(C, H, **kw), torch.zeros(C, H, **kw)], dim=1)  # [C, 2, H]
        return w

    def _activation_code(self, site, name: str) -> int:
        names = self.activations.get(site, ())
        if name not in names:
            self.activations[site] = names = names + (name,)
        return names.index(name)

    def write(self, slot: int, adapter: Adapter) -> None:
        self.held[slot] = dict(adapter.bottleneck)
        for site, b in adapter.bottleneck.items():
            d, H = b.down_weight.shape[0], self.info.hidden_size
            w = self._tensors(site, d, H, b.ln_before is not None, b.ln_after is not None)
            self._zero(w, slot)
            w["down"][slot, :d] = b.down_weight
            w["up"][slot, :, :d] = b.up_weight
            if b.down_bias is not None:
                w["down_bias"][slot, :d] = b.down_bias
            if b.up_bias is not None:
                w["up_bias"][slot] = b.up_bias
            w["scaling"][slot] = torch.as_tensor(b.scaling, dtype=self.dtype, device=self.device).expand(H)
            w["activation"][slot] = self._activation_code(site, b.activation.lower())
            for name in FLAGS:
                w["flags"][slot, COLUMN[name]] = getattr(b, name) is True
            w["flags"][slot, COLUMN["present"]] = True
            for name in ("ln_before", "ln_after"):
                if (params := getattr(b, name)) is not None:
                    w[name][slot, 0], w[name][slot, 1] = params
                    w["flags"][slot, COLUMN[name]] = True

    def _zero(self, w: dict, slot: int) -> None:
        for name, value in w.items():
            if name in ("ln_before", "ln_after"):
                value[slot, 0], value[slot, 1] = 1.0, 0.0
            elif name == "scaling":
                value[slot] = 1.0
            else:
                value[slot] = 0

    def clear(self, slot: int) -> None:
        for site in self.held.pop(slot, {}):
            if site in self.sites:
                self._zero(self.sites[site], slot)

    def active_sites(self, slots) -> set:
        return {site for s in slots for site in self.held.get(s, {})}

    @staticmethod
    def route(site) -> str:
        """A slot index per location: a row whose adapter acts after the feed-forward only (Pfeiffer)
        reads slot 0 at the attention sites. Its weights are the bank's memory traffic."""
        return site[1]

    def uses(self, slot: int, location: str) -> bool:
        return any(site[1] == location for site in self.held.get(slot, {}))

    def residual(self, site, s: Tensor, r: Tensor, slots: Tensor, groups) -> Tensor | None:
        """The new hidden state at `site`, or None if no banked adapter acts there."""
        w = self.sites.get(site)
        if w is None:
            return None
        if groups is None:
            return banked_compose(w, self.activations[site], s, r, slots)
        h = s + r
        for slot, tokens in groups:
            b = self.held.get(slot, {}).get(site)
            if b is not None:
                h[tokens] = compose([b], s[tokens], r[tokens], None)
        return h
