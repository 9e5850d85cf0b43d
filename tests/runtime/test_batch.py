"""The adapter step at one site against a plain loop: every row alone through the reference
math of methods/. Rows served from the banks (per-token gathers, and per-slot groups), rows
on the side path (stacks, gated adapters), rows without adapters, all in one step."""

from __future__ import annotations

import itertools

import pytest
import torch

from adapter_runtime.adapters import Adapter, Bottleneck, Invertible, LoRA, Scale
from adapter_runtime.banks import AdapterBanks
from adapter_runtime.batch import build_adapter_step
from adapter_runtime.methods import bottleneck as bottleneck_math
from adapter_runtime.methods import invertible as invertible_math
from adapter_runtime.methods import stack as stack_math
from adapter_runtime.models.common import ModelInfo

H, OUT = 16, 24
g = torch.Generator().manual_seed(0)
INFO = ModelInfo("test", "test", H, 1, 1, 1, H, H, 10, 64, {"m": (H, OUT)})


def rand(*shape):
    return torch.randn(*shape, generator=g)


def lora(r):
    return LoRA(rand(r, H), rand(OUT, r), scale=0.5 + r / 8)


def bottleneck(act, d, **flags):
    return Bottleneck(rand(d, H), rand(d), rand(H, d), rand(H), act, 0.7, **flags)


def ln():
    return (1 + 0.1 * rand(H), 0.1 * rand(H))


def adapter(name, linear=None, bn=None, inv=None):
    return Adapter(name, "test", "test", {}, linear={(0, "m"): linear} if linear else {},
                   bottleneck={(0, "ffn"): bn} if bn else {}, invertible=inv)


def invertible(act, width):
    half = H // 2
    return Invertible(rand(width, half), rand(width), rand(half, width), rand(half),
                      rand(width, half), rand(width), rand(half, width), rand(half), act)


# every combination of the five bottleneck flags, with and without the adapter LayerNorms
FLAG_NAMES = ("is_parallel", "original_ln_before", "residual_before_ln", "adapter_residual_before_ln", "original_ln_after")
VARIANTS = [adapter(f"bn{i}", bn=bottleneck(("relu", "swish", "gelu")[i % 3], 2 + i % 5, **dict(zip(FLAG_NAMES, flags)),
                                            ln_before=ln() if i % 4 == 1 else None, ln_after=ln() if i % 3 == 2 else None))
            for i, flags in enumerate(itertools.product([False, True], repeat=5))]
ADAPTERS = [
    adapter("l1", lora(2)), adapter("l2", lora(4)), adapter("l3", lora(3)),
    adapter("o1", Scale(rand(OUT))), adapter("o2", Scale(rand(OUT))),
    adapter("i1", Scale(rand(H), on_input=True)), adapter("i2", Scale(rand(H), on_input=True)),
    adapter("chan", bn=Bottleneck(rand(3, H), None, rand(H, 3), None, "relu", rand(H))),
    adapter("inv1", inv=invertible("relu", 4)), adapter("inv2", inv=invertible("gelu", 6)),
    adapter("madx", bn=bottleneck("relu", 4), inv=invertible("relu", 3)),
    adapter("gated", bn=Bottleneck(rand(4, H), rand(4), rand(H, 4), rand(H), "relu", 1.0, gate=(rand(1, H), rand(1)))),
    adapter("gated-lora", LoRA(rand(2, H), rand(OUT, 2), 1.0, gate_weight=rand(2, H), gate_bias=rand(2))),
    *VARIANTS,
]
BY_NAME = {a.name: a for a in ADAPTERS}


def reference_row(setup, x, s, r, e, weight):
    """One row alone (x, s, r, e [n, H]) through the reference math."""
    one_row = torch.zeros(x.shape[0], dtype=torch.long)  # gates average over the row's tokens
    effects = [f for a in setup if (f := a.linear.get((0, "m"))) is not None]
    y = stack_math.apply_output(x, stack_math.scale_input(x, effects) @ weight.T, effects, one_row)
    bns = [b for a in setup if (b := a.bottleneck.get((0, "ffn"))) is not None]
    h = bottleneck_math.compose(bns, s, r, one_row) if bns else s + r
    if setup and setup[0].invertible is not None:
        e = invertible_math.forward(setup[0].invertible, e)
    return y, h, e


def close(got, want) -> bool:
    """Equal up to fp32 summation order (random unscaled weights make values large)."""
    return bool((got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item()))


ROWS = [
    [a.name for a in ADAPTERS],  # every row has one
    ["l1", None, "l2", "o1", None, "o2", "i1", "i2", "bn3", "bn17", "inv1", "madx", "gated", None],  # base rows between
    [("l1", "bn1"), "l1", "l1", "l2", ("bn1", "bn2"), "bn1", "bn2", "gated-lora", None],  # stacks next to single adapters
]


@pytest.mark.parametrize("tokens_per_row", [1, 3])
@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("rows", ROWS)
def test_step_equals_plain_loop(rows, gather, tokens_per_row):
    setups = [() if n is None else tuple(BY_NAME[m] for m in ((n,) if isinstance(n, str) else n)) for n in rows]
    B, n = len(setups), tokens_per_row
    banks = AdapterBanks(INFO, 64, torch.device("cpu"), torch.float32)
    step = build_adapter_step(setups, [n] * B, "cpu", banks=banks, gather=gather)
    x, s, r, e = (rand(B * n, H) for _ in range(4))
    weight = rand(OUT, H)
    x_before = x.clone()
    y = step.linear(0, "m", lambda v: v @ weight.T, x)
    h = step.residual(0, "ffn", s, r)
    emb = step.embeddings(e.clone())
    assert torch.equal(x, x_before), "the site input must not be modified in place"
    for b, setup in enumerate(setups):
        t = slice(b * n, (b + 1) * n)
        y_ref, h_ref, e_ref = reference_row(setup, x[t], s[t], r[t], e[t], weight)
        assert close(y[t], y_ref) and close(h[t], h_ref) and close(emb[t], e_ref), rows[b]
        if not setup:  # no adapter: bit for bit the base
            assert torch.equal(y[t], (x @ weight.T)[t]) and torch.equal(h[t], s[t] + r[t]) and torch.equal(emb[t], e[t])


def test_slots_are_reused_and_follow_identity_not_name():
    banks = AdapterBanks(INFO, 2, torch.device("cpu"), torch.float32)
    a, b, c = (adapter("same-name", lora(2)) for _ in range(3))
    sa, sb = banks.slot(a), banks.slot(b)
    assert sa != sb and banks.slot(a) == sa  # same name, different adapters: different slots
    sc = banks.slot(c, in_use=[sa])  # full: the least recently used slot not in use goes
    assert sc == sb and banks.peek(b) is None and banks.peek(a) == sa
    x = rand(1, H)
    step = build_adapter_step([(c,)], [1], "cpu", banks=banks)
    y = step.linear(0, "m", lambda v: torch.zeros(1, OUT), x)
    assert close(y, stack_math.apply_output(x, torch.zeros(1, OUT), [c.linear[(0, "m")]], None))


def test_bankable_is_remembered_per_content_not_per_uid_alone():
    """A merged adapter's rows use a copy without its linear effects under the same uid: the
    remembered answer must not carry over between the two."""
    from dataclasses import replace

    from adapter_runtime.banks import bankable
    from adapter_runtime.batch import without_linear

    banks = AdapterBanks(INFO, 4, torch.device("cpu"), torch.float32)
    gated = replace(lora(4), gate_weight=rand(2, H), gate_bias=rand(2))  # gated LoRA: the side path
    full = adapter("g", linear=gated, bn=bottleneck("relu", 4))
    residue = without_linear(full)
    assert residue.uid == full.uid
    for a in (full, residue, full, residue):
        assert banks.bankable(a) == bankable(a)
    assert not banks.bankable(full) and banks.bankable(residue)


def test_rows_read_slot_0_where_their_adapter_has_nothing_and_still_equal_the_loop():
    """Per (kind, location) slot indices: a row whose adapter has no bottleneck at a location (or
    none at all) reads the identity slot 0 there, not its own slot's zeros (memory traffic), and
    every row still equals the reference."""
    both = Adapter("both", "test", "test", {}, bottleneck={(0, "attn"): bottleneck("relu", 3), (0, "ffn"): bottleneck("gelu", 5)})
    ffn_only, lora_only = adapter("ffn-only", bn=bottleneck("swish", 4)), adapter("lora-only", lora(2))
    setups = [(both,), (ffn_only,), (lora_only,), ()]
    banks = AdapterBanks(INFO, 8, torch.device("cpu"), torch.float32)
    step = build_adapter_step(setups, [1] * 4, "cpu", banks=banks, static=True)
    own = [banks.peek(a) for a in (both, ffn_only, lora_only)]
    assert step.slots[("bottleneck", "attn")].tolist() == [own[0], 0, 0, 0]
    assert step.slots[("bottleneck", "ffn")].tolist() == [own[0], own[1], 0, 0]
    assert step.slots[("lora", None)].tolist() == [0, 0, own[2], 0]
    s, r = rand(4, H), rand(4, H)
    for location in ("attn", "ffn"):
        h = step.residual(0, location, s, r)
        for b, setup in enumerate(setups):
            bns = [x for a in setup if (x := a.bottleneck.get((0, location))) is not None]
            want = bottleneck_math.compose(bns, s[b : b + 1], r[b : b + 1], None) if bns else s[b : b + 1] + r[b : b + 1]
            assert close(h[b : b + 1], want), (location, b)
