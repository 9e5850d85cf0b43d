"""AdapterFusion layers as `save_adapter_fusion` writes them (reference §8): a directory with
`adapter_fusion_config.json` (the fusion config under `config`, the fused adapters under
`adapter_names`) and `model_adapter_fusion.safetensors` or `pytorch_model_adapter_fusion.bin`,
keys "{base}.h.{l}.{attention,output}_adapters.adapter_fusion_layer.{name}.{query,key,value}.*".

A fusion layer exists at every layer of each location the fused adapters all have; its config
decides which projections it holds (`dense` is built when none is, and never used). With
`temperature: true` the library divides the scores by T = 50 and lowers T by 0.05 at *every*
forward, in eval too, and never saves it: the same request twice gives different outputs, so
such a fusion is refused (it cannot be served reproducibly, nor equal any one library run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from ...adapters import Adapter, Fusion, FusionLayer
from ...errors import AdapterFormatError, AdapterIncompatible, AdapterUnsupported
from ...models.common import ModelInfo
from .. import read_json, read_tensors
from .bottleneck import BOTTLENECK_LOCATIONS
from .keys import Weights

FUSION_CONFIG = "adapter_fusion_config.json"
FUSION_WEIGHT_FILES = ("model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin")
FLAGS = ("query", "key", "value", "query_before_ln", "residual_before", "value_before_softmax", "temperature")


def is_fusion_dir(directory: Path) -> bool:
    return (Path(directory) / FUSION_CONFIG).is_file() and not (Path(directory) / "adapter_config.json").is_file()


def _flags(config: Mapping) -> dict[str, bool]:
    flags = {}
    for key in FLAGS:
        value = config.get(key, False)
        if not isinstance(value, bool):
            raise AdapterFormatError(f"{FUSION_CONFIG}: config.{key} must be true or false, got {value!r}")
        flags[key] = value
    if flags["temperature"]:
        raise AdapterUnsupported(
            "AdapterFusion with temperature: true cannot be served: adapters 1.3.0 divides the fusion scores by a "
            "temperature that starts at 50 and drops by 0.05 at every forward pass, also in eval mode, and is not "
            "saved, so the same request gives different outputs each time; retrain or save it with temperature: false")
    return flags


def _adapter_names(meta: Mapping) -> tuple[str, ...]:
    names = meta.get("adapter_names")
    if names is None and isinstance(meta.get("name"), str):
        names = meta["name"].split(",")  # the library's default fusion name joins them
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise AdapterFormatError(f"{FUSION_CONFIG}: adapter_names must be a non-empty list of adapter names")
    return tuple(names)


def fused_adapter_names(directory: Path) -> tuple[str, ...]:
    """The adapters a saved fusion fuses, from its config alone (no weights read)."""
    return _adapter_names(read_json(Path(directory) / FUSION_CONFIG))


def read_fusion(directory: Path, info: ModelInfo, name: str | None = None) -> Adapter:
    directory = Path(directory)
    meta = read_json(directory / FUSION_CONFIG)
    if not isinstance(meta.get("config"), Mapping):
        raise AdapterFormatError(f"{FUSION_CONFIG} has no `config` object")
    if meta.get("model_type") not in (None, info.model_type):
        raise AdapterIncompatible(f"fusion was trained for model_type {meta['model_type']!r}, the base model is "
                                  f"{info.model_type!r}")
    if meta.get("hidden_size") not in (None, info.hidden_size):
        raise AdapterIncompatible(f"fusion hidden_size is {meta['hidden_size']}, the base model's is {info.hidden_size}")
    flags, names = _flags(meta["config"]), _adapter_names(meta)
    H = info.hidden_size
    w = Weights(read_tensors(directory, FUSION_WEIGHT_FILES), meta.get("name"), info)
    layers = {}
    for layer in range(info.num_layers):
        for container, location in BOTTLENECK_LOCATIONS.values():
            p = f"{layer}.{container}.adapter_fusion_layer."
            if not any(k.startswith(p) for k in w.tensors):
                continue
            if not (flags["query"] or flags["key"] or flags["value"]):
                w.take(p + "dense.weight", (1, H)), w.take(p + "dense.bias", (1,))  # built, never used
            layers[(layer, location)] = FusionLayer(
                query=(w.take(p + "query.weight", (H, H)), w.take(p + "query.bias", (H,))) if flags["query"] else None,
                key=(w.take(p + "key.weight", (H, H)), w.take(p + "key.bias", (H,))) if flags["key"] else None,
                value=w.take(p + "value.weight", (H, H)) if flags["value"] else None,
            )
    w.check_all_used()
    if not layers:
        raise AdapterFormatError("the fusion weights hold no fusion layer")
    fusion = Fusion(adapter_names=names, layers=layers, query_before_ln=flags["query_before_ln"],
                    residual_before=flags["residual_before"], value_before_softmax=flags["value_before_softmax"])
    return Adapter(name=name or directory.name, format="adapterhub", method="fusion", config=meta, fusion=fusion)
