"""The bottleneck bank against the per-adapter reference loop."""

from types import SimpleNamespace

import pytest
import torch

from adapter_runtime.adapters import Adapter, Bottleneck
from adapter_runtime.methods import lower_materialize
from adapter_runtime.methods.bottleneck import BottleneckBank, banked_compose, compose, phm_weight

H = 64
SITE = (0, "ffn")


def plain(gen, d: int, activation: str = "relu", **flags) -> Bottleneck:
    r = lambda *shape: torch.randn(*shape, generator=gen) * 0.3  # noqa: E731
    return Bottleneck(r(d, H), r(d), r(H, d), r(H), activation, 0.7, **flags)


def compacter(gen, d: int, n: int, activation: str = "gelu", **flags) -> Bottleneck:
    """A Compacter layer: the kron sum of random PHM factors (materialized to dense, as at load)."""
    r = lambda *shape: torch.randn(*shape, generator=gen) * 0.3  # noqa: E731
    down, up = phm_weight(r(n, n, n), r(n, H // n, d // n)).T, phm_weight(r(n, n, n), r(n, d // n, H // n)).T
    return Bottleneck(down, r(d), up, r(H), activation, 1.0, **flags)


def run_bank(adapters: list[Bottleneck], slots_of_tokens: list[int], gen, compiled: bool = False):
    bank = BottleneckBank(SimpleNamespace(hidden_size=H), capacity=len(adapters) + 1, device=torch.device("cpu"),
                          dtype=torch.float32)
    for slot, b in enumerate(adapters, 1):
        bank.write(slot, Adapter(name=f"a{slot}", format="adapterhub", method="bottleneck", config={},
                                 bottleneck={SITE: b}))
    s, r = torch.randn(len(slots_of_tokens), H, generator=gen), torch.randn(len(slots_of_tokens), H, generator=gen)
    slots = torch.tensor(slots_of_tokens)
    if compiled:  # inductor's fused kernel (the stored inputs of `materialized` included)
        lower_materialize()
        got = torch.compile(banked_compose, dynamic=False)(bank.sites[SITE], bank.activations[SITE], s, r, slots)
    else:
        got = banked_compose(bank.sites[SITE], bank.activations[SITE], s, r, slots)
    want = torch.stack([s[i] + r[i] if k == 0 else compose([adapters[k - 1]], s[i:i + 1], r[i:i + 1], None)[0]
                        for i, k in enumerate(slots_of_tokens)])
    return bank, got, want, s + r


@pytest.mark.parametrize("order, compiled", [("narrow first", False), ("wide first", False), ("narrow first", True)],
                         ids=["narrow first", "wide first", "compiled"])  # compiled: inductor's kernel, ~5 s
def test_adapters_of_any_width_activation_and_flags_in_one_site_equal_the_reference(order, compiled):
    """One gathered pass over a site holding adapters of several widths (zero-padded to the
    widest, grown when a wider one arrives), activations and residual flags."""
    gen = torch.Generator().manual_seed(0)
    adapters = [plain(gen, 4, "tanh", is_parallel=True), compacter(gen, 8, 4),
                plain(gen, 16, original_ln_before=False, residual_before_ln=False),
                compacter(gen, 16, 2, "relu", original_ln_after=False), plain(gen, 32, "sigmoid")]
    if order == "wide first":
        adapters = adapters[::-1]
    slots = [0, 1, 2, 3, 4, 5, 3, 2, 0, 5]
    bank, got, want, base = run_bank(adapters, slots, gen, compiled)
    assert bank.sites[SITE]["down"].shape[1] == 32
    assert all(not torch.allclose(want[i], base[i], atol=1e-3) for i, k in enumerate(slots) if k)  # adapters act
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
