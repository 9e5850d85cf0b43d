"""The invertible (MAD-X) bank against the per-adapter NICE coupling."""

from types import SimpleNamespace

import pytest
import torch

from adapter_runtime.adapters import Adapter, Invertible
from adapter_runtime.methods import lower_materialize
from adapter_runtime.methods.invertible import InvertibleBank, banked_forward, forward

H = 64


def coupling(gen, f_width: int, g_width: int, activation: str) -> Invertible:
    r = lambda *shape: torch.randn(*shape, generator=gen) * 0.3  # noqa: E731
    half = H // 2
    return Invertible(r(f_width, half), r(f_width), r(half, f_width), r(half),
                      r(g_width, half), r(g_width), r(half, g_width), r(half), activation)


@pytest.mark.parametrize("order, compiled", [("narrow first", False), ("wide first", False), ("narrow first", True)],
                         ids=["narrow first", "wide first", "compiled"])  # compiled: inductor's kernel, ~5 s
def test_couplings_of_any_width_and_activation_in_one_table_equal_the_reference(order, compiled):
    """One gathered pass over couplings of several hidden widths (zero-padded to the widest,
    grown when a wider one arrives) and activations; tokens of slot 0 keep their embedding."""
    gen = torch.Generator().manual_seed(1)
    adapters = [coupling(gen, 4, 8, "relu"), coupling(gen, 16, 2, "gelu"), coupling(gen, 32, 32, "tanh")]
    if order == "wide first":
        adapters = adapters[::-1]
    bank = InvertibleBank(SimpleNamespace(hidden_size=H), capacity=4, device=torch.device("cpu"), dtype=torch.float32)
    for slot, inv in enumerate(adapters, 1):
        bank.write(slot, Adapter(name=f"a{slot}", format="adapterhub", method="bottleneck", config={}, invertible=inv))
    slots_of_tokens = [0, 1, 2, 3, 3, 0, 1]
    x, slots = torch.randn(len(slots_of_tokens), H, generator=gen), torch.tensor(slots_of_tokens)
    if compiled:
        lower_materialize()
        got = torch.compile(banked_forward, dynamic=False)(bank.weights, bank.activations, x, slots)
    else:
        got = banked_forward(bank.weights, bank.activations, x, slots)
    want = torch.stack([x[i] if k == 0 else forward(adapters[k - 1], x[i:i + 1])[0] for i, k in enumerate(slots_of_tokens)])
    assert bank.weights["f0"].shape[1] == 32 and bank.weights["g0"].shape[1] == 32
    assert all(not torch.allclose(want[i], x[i], atol=1e-3) for i, k in enumerate(slots_of_tokens) if k)  # they act
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
