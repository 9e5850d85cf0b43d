"""ReFT adapters (ReftConfig: LoReFT, NoReFT, DiReFT; reference §8): per layer one intervention
unit for the prefix positions and one for the suffix positions (one when tied).

Keys, per layer l and unit u: "{l}.reft_layer.refts.units.{u}.learned_source.{weight,bias}" and
the projection: "projection.weight", or with `orthogonality` torch's parametrization state
"projection.parametrizations.weight.original" and ".0.base" (evaluated here once).

`subtract_projection` is a class attribute of the library's configs, not a saved field: a
reloaded DiReFT is a ReftConfig with subtract_projection = True, i.e. it runs as NoReFT (the
library loads every saved ReFT so). A config that carries the key explicitly sets it, as the
library's `from_dict` does.
"""

from __future__ import annotations

from typing import Mapping

from ...adapters import Reft, ReftUnit
from ...errors import AdapterFormatError, AdapterUnsupported
from ...methods.reft import orthogonal_weight
from ...models.common import ModelInfo
from .keys import Weights
from .parts import Part, activation_name


def _count(config: Mapping, key: str, positive: bool = False) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < (1 if positive else 0):
        raise AdapterFormatError(f"ReFT {key} must be a {'positive' if positive else 'non-negative'} integer, "
                                 f"got {value!r}")
    return value


def _reft_layers(config: Mapping, info: ModelInfo) -> list[int]:
    layers = config.get("layers", "all")
    if layers == "all":
        return list(range(info.num_layers))
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise AdapterFormatError(f"ReFT layers must be 'all' or a list of layer indices, got {layers!r}")
    # the library adds a unit to each layer whose index is listed; others are ignored
    return [i for i in range(info.num_layers) if i in set(layers)]


def read_reft(config: Mapping, w: Weights, info: ModelInfo) -> Part:
    H = info.hidden_size
    r = _count(config, "r", positive=True)
    prefix, suffix = _count(config, "prefix_positions"), _count(config, "suffix_positions")
    if config.get("dtype") not in (None, "float32"):
        raise AdapterUnsupported(f"ReFT with dtype {config['dtype']!r}: the library computes its interventions in "
                                 "that precision, this server in the model's; only dtype null or 'float32' is served")
    tied, orthogonal = bool(config.get("tied_weights")), bool(config.get("orthogonality"))
    subtract = config.get("subtract_projection", True)
    act = config.get("non_linearity")
    act = None if act is None else activation_name(act)
    units = {}
    for layer in _reft_layers(config, info):
        made = []
        for u in range(1 if tied else 2):
            p = f"{layer}.reft_layer.refts.units.{u}."
            if orthogonal:
                n = max(r, H)
                projection = orthogonal_weight(w.take(p + "projection.parametrizations.weight.original", (r, H)),
                                               w.take(p + "projection.parametrizations.weight.0.base", (n, n)))
            else:
                projection = w.take(p + "projection.weight", (r, H))
            made.append(ReftUnit(source_weight=w.take(p + "learned_source.weight", (r, H)),
                                 source_bias=w.take(p + "learned_source.bias", (r,)),
                                 projection=projection, subtract_projection=bool(subtract), activation=act))
        units[layer] = tuple(made)
    method = "loreft" if orthogonal else "noreft" if subtract else "direft"
    return Part(method, reft=Reft(units=units, prefix_positions=prefix, suffix_positions=suffix, tied=tied))
