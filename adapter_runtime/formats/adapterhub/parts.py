"""What one (sub-)config of an AdapterHub adapter contributes, and the config helpers every
method reader shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from ...adapters import Bottleneck, Invertible, LinearEffect, Prefix, Reft
from ...errors import AdapterFormatError, AdapterUnsupported
from ...methods.bottleneck import activation
from ...models.common import ModelInfo


@dataclass
class Part:
    """What one (sub-)config contributes; a union merges several."""

    method: str
    linear: dict[tuple[int, str], LinearEffect] = field(default_factory=dict)
    bottleneck: dict[tuple[int, str], Bottleneck] = field(default_factory=dict)
    invertible: Invertible | None = None
    prefix: Prefix | None = None
    reft: Reft | None = None


def layers_of(config: Mapping, info: ModelInfo) -> list[int]:
    leave_out = config.get("leave_out") or []
    if not isinstance(leave_out, list) or not all(isinstance(i, int) for i in leave_out):
        raise AdapterFormatError(f"leave_out must be a list of layer indices, got {leave_out!r}")
    return [i for i in range(info.num_layers) if i not in set(leave_out)]


def activation_name(name) -> str:
    if not isinstance(name, str):
        raise AdapterFormatError(f"non_linearity must be a string, got {name!r}")
    try:
        activation(name)
    except Exception:
        raise AdapterUnsupported(f"unknown non_linearity {name!r}") from None
    return name


