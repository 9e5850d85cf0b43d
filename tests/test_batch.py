"""The per-row adapter dispatch against a plain loop: every row alone through the pure
method functions. Covers the gathered paths (many groups of one kind at a site), with all
rows covered, some rows without adapters, and stacks mixed in."""

from __future__ import annotations

import pytest
import torch

from adapter_runtime.adapters import Adapter, Bottleneck, LoRA, Scale
from adapter_runtime.batch import build_adapter_batch
from adapter_runtime.methods import bottleneck as bottleneck_math
from adapter_runtime.methods import lora as linear_math

H, OUT, S = 16, 24, 3
g = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=g)


def lora(r):
    return LoRA(rand(r, H), rand(OUT, r), scale=0.5 + r / 8)


def bottleneck(act, d, **flags):
    return Bottleneck(rand(d, H), rand(d), rand(H, d), rand(H), act, 0.7, **flags)


def adapter(name, linear=None, bn=None):
    return Adapter(name, "test", "test", {}, linear={(0, "m"): linear} if linear else {},
                   bottleneck={(0, "ffn"): bn} if bn else {})


ADAPTERS = [
    adapter("l1", lora(2)), adapter("l2", lora(4)), adapter("l3", lora(3)),
    adapter("o1", Scale(rand(OUT))), adapter("o2", Scale(rand(OUT))),
    adapter("i1", Scale(rand(H), on_input=True)), adapter("i2", Scale(rand(H), on_input=True)),
    adapter("pf1", bn=bottleneck("relu", 4)), adapter("pf2", bn=bottleneck("relu", 6, original_ln_after=False)),
    adapter("pf3", bn=bottleneck("relu", 3, residual_before_ln=False)),
    adapter("hb1", bn=bottleneck("swish", 4, original_ln_before=False)),
    adapter("hb2", bn=bottleneck("swish", 2, original_ln_before=False, residual_before_ln=False)),
    adapter("gated", bn=Bottleneck(rand(4, H), rand(4), rand(H, 4), rand(H), "relu", 1.0, gate=(rand(1, H), rand(1)))),
]
BY_NAME = {a.name: a for a in ADAPTERS}


def reference_row(setup, x, s, r, weight):
    base = lambda v: v @ weight.T  # noqa: E731
    effects = [e for a in setup if (e := a.linear.get((0, "m"))) is not None]
    y = linear_math.apply_output(x, base(linear_math.scale_input(x, effects)), effects, None) if effects else base(x)
    bns = [b for a in setup if (b := a.bottleneck.get((0, "ffn"))) is not None]
    h = bottleneck_math.compose(bns, s, r, None) if bns else s + r
    return y, h


@pytest.mark.parametrize("rows", [
    ["l1", "l2", "l3", "o1", "o2", "i1", "i2", "pf1", "pf2", "pf3", "hb1", "hb2", "gated"],  # every row has one
    ["l1", None, "l2", "o1", None, "o2", "i1", "i2", "pf1", "hb1", "pf3", "pf2", "hb2", None],  # base rows between
    [("l1", "pf1"), "l1", "l1", "l2", ("pf1", "pf2"), "pf1", "pf2", None],  # stacks next to single adapters
])
def test_dispatch_equals_plain_loop(rows):
    setups = [() if n is None else tuple(BY_NAME[m] for m in ((n,) if isinstance(n, str) else n)) for n in rows]
    B = len(setups)
    x, s, r = rand(B, S, H), rand(B, S, H), rand(B, S, H)
    weight = rand(OUT, H)
    batch = build_adapter_batch(setups, [S] * B, [False] * B, S, torch.device("cpu"))
    x_before = x.clone()
    y = batch.linear(0, "m", lambda v: v @ weight.T, x)
    h = batch.residual(0, "ffn", s, r)
    assert torch.equal(x, x_before), "the site input must not be modified in place"
    for b, setup in enumerate(setups):
        y_ref, h_ref = reference_row(setup, x[b : b + 1], s[b : b + 1], r[b : b + 1], weight)
        assert (y[b : b + 1] - y_ref).abs().max() <= 1e-5, rows[b]
        assert (h[b : b + 1] - h_ref).abs().max() <= 1e-5, rows[b]
