"""Merge one adapter's linear effects into the base weights, and reset them bit for bit.

The engine calls these between steps, never inside one. While merged, the adapter's rows run
on the merged weights with no adapter work at the merged sites, and every other row gets the
merged delta undone (batch.Unmerge), so nobody's output changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .adapters import Adapter
from .batch import MergedAdapter, without_linear
from .errors import AdapterConflict, NumericOverflow
from .methods import merge as merge_math
from .models import decoder_layers


def site_linear(model: nn.Module, layer: int, module: str) -> nn.Linear:
    return decoder_layers(model)[layer].get_submodule(module)


@dataclass(frozen=True)
class MergeRecord:
    merged: MergedAdapter
    originals: dict[tuple[int, str], tuple[Tensor, Tensor | None]]  # host copies, bit-exact


def why_not_mergeable(adapter: Adapter) -> str | None:
    """None if the adapter can be merged, else the reason (shown to the admin with a 409)."""
    if not adapter.linear:
        kinds = [k for k, present in (("bottleneck", adapter.bottleneck), ("invertible", adapter.invertible),
                                      ("prefix tuning", adapter.prefix), ("prompt tuning", adapter.prompt)) if present]
        return (f"adapter {adapter.name!r} ({', '.join(kinds) or adapter.method}) has no linear-layer part: only LoRA and "
                "(IA)^3 adapters (or the LoRA part of a union) change base weights and can be merged")
    for (layer, module), effect in adapter.linear.items():
        try:
            merge_math.check_mergeable(effect, f"layer {layer} {module}")
        except AdapterConflict as e:
            return f"adapter {adapter.name!r} cannot be merged: {e}"
    return None


def merge(model: nn.Module, adapter: Adapter) -> MergeRecord:
    """Fold `adapter` (already on the model's device/dtype) into the base weights."""
    if (reason := why_not_mergeable(adapter)) is not None:
        raise AdapterConflict(reason)
    originals, inverse, identities = {}, {}, {}
    with torch.no_grad():
        for (layer, module), effect in adapter.linear.items():
            linear = site_linear(model, layer, module)
            originals[(layer, module)] = (
                linear.weight.detach().to("cpu", copy=True),
                linear.bias.detach().to("cpu", copy=True) if linear.bias is not None else None,
            )
            weight, bias = merge_math.merged_weights(effect, linear.weight, linear.bias)
            if not (bool(torch.isfinite(weight).all()) and (bias is None or bool(torch.isfinite(bias).all()))):
                restore(model, originals)  # the sites merged so far, back bit for bit
                raise NumericOverflow(f"merging adapter {adapter.name!r} would make the base weights of layer {layer} "
                                      f"{module} non-finite (its weights overflow {str(weight.dtype).removeprefix('torch.')}); "
                                      "nothing was merged")
            inverse[(layer, module)] = merge_math.dense_undo(linear.weight, weight, identities) \
                if merge_math.is_dora(effect) else merge_math.inverse(effect)
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
    return MergeRecord(MergedAdapter(adapter, without_linear(adapter), inverse), originals)


def reset(model: nn.Module, record: MergeRecord) -> None:
    """Copy the original tensors back: the base weights are torch.equal to before the merge."""
    restore(model, record.originals)


def restore(model: nn.Module, originals: dict[tuple[int, str], tuple[Tensor, Tensor | None]]) -> None:
    with torch.no_grad():
        for (layer, module), (weight, bias) in originals.items():
            linear = site_linear(model, layer, module)
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
