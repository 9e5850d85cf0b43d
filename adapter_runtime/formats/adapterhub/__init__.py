"""Reader for AdapterHub `adapters` 1.3.0 directories (`model.save_adapter()`), split by concern:

    keys.py        the key grammar of a weights file (base prefix, layer, container, adapter name)
    parts.py       what one (sub-)config contributes; helpers every method reader shares
    bottleneck.py  BnConfig, SeqBn, DoubleSeqBn, ParBn, Compacter*, *Inv -> Bottleneck per (layer, loc)
                                                                        (+ Invertible for *Inv)
    lora.py        lora, composition_mode "add" (also VeRA, DoRA, DvoRA, MTL-LoRA) -> LoRA per (layer, module)
                   lora, composition_mode "scale" (IA3)                          -> Scale per (layer, module)
    prefix.py      prefix_tuning (MLP evaluated once here, flat, ejected)       -> Prefix
    reft.py        reft (LoReFT, NoReFT, DiReFT)                                -> Reft
    head.py        the flex causal-LM head of an `*AdapterModel` adapter         -> LMHead
    fusion.py      a `save_adapter_fusion` directory (its own config and weights) -> Fusion
    (this file)    the directory: config fixes, a union's parts merged, every key used

A directory holds `adapter_config.json` and `adapter.safetensors` or `pytorch_adapter.bin`
(head files are ignored unless saved from a flex-head model: they only repeat the tied
embedding). Every tensor is checked against the base model and every key of the file must be
used, so that a renamed or misplaced tensor is an error rather than a silently missing adapter.
The math and traps are those of shared/reference/adapterhub-format.md (cited as §n below).
Which combinations of adapters compose is decided in adapter_runtime/composition.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from packaging.version import InvalidVersion, Version

from ...adapters import Adapter
from ...errors import AdapterFormatError, AdapterIncompatible, AdapterUnsupported
from ...models.common import ModelInfo
from .. import read_json, read_tensors
from .bottleneck import read_bottleneck
from .head import read_flex_head
from .keys import WEIGHT_FILES, Weights
from .lora import LORA_MODULES, read_lora
from .parts import Part
from .prefix import read_prefix
from .reft import read_reft

LEGACY_ACTIVATIONS = {"gelu": "gelu_new", "gelu_orig": "gelu"}  # files without `version`


def _prompt_tuning(config, w, info) -> Part:
    raise AdapterUnsupported(
        "prompt tuning (architecture 'prompt_tuning') cannot be used with GPT-2 or Llama: adapters 1.3.0 rejects "
        "it for these models, so such a file cannot come from them"
    )


READERS = {None: read_bottleneck, "bottleneck": read_bottleneck, "lora": read_lora, "mtl_lora": read_lora,
           "prefix_tuning": read_prefix, "prompt_tuning": _prompt_tuning, "reft": read_reft}


def _read_parts(config: Mapping, w: Weights, info: ModelInfo) -> list[Part]:
    if not isinstance(config, Mapping):
        raise AdapterFormatError("adapter_config.json `config` must be an object")
    arch = config.get("architecture")
    if arch == "union":
        configs = config.get("configs")
        if not isinstance(configs, list) or not configs:
            raise AdapterFormatError("a union config needs a non-empty `configs` list")
        return [p for c in configs for p in _read_parts(c, w, info)]
    if arch not in READERS:
        raise AdapterUnsupported(f"unknown adapter architecture {arch!r}; supported: bottleneck, lora (incl. IA3, VeRA, "
                                 "DoRA), mtl_lora, prefix_tuning, reft, union")
    return [READERS[arch](config, w, info)]


def _merge(parts: list[Part]) -> Part:
    merged = Part(parts[0].method if len(parts) == 1 else "union")
    for part in parts:
        for table in ("linear", "bottleneck"):
            mine, theirs = getattr(merged, table), getattr(part, table)
            if clash := mine.keys() & theirs.keys():
                raise AdapterUnsupported(f"two parts of the union act on the same {table} site {sorted(clash)[0]}")
            mine.update(theirs)
        for single in ("invertible", "prefix", "reft"):
            if getattr(part, single) is not None:
                if getattr(merged, single) is not None:
                    raise AdapterUnsupported(f"a union may hold only one {single} part")
                setattr(merged, single, getattr(part, single))
    return merged


def _fix_legacy_config(meta: dict) -> dict:
    """The loader-side fixes of the library (§1.2), on a copy."""
    config = dict(meta["config"])
    if "version" not in meta and config.get("non_linearity") in LEGACY_ACTIVATIONS:
        config["non_linearity"] = LEGACY_ACTIVATIONS[config["non_linearity"]]
    if isinstance(config.get("invertible_adapter"), Mapping):  # adapter-transformers v1 nesting
        nested = config.pop("invertible_adapter")
        config["inv_adapter"] = nested.get("block_type")
        config["inv_adapter_reduction_factor"] = nested.get("reduction_factor")
    version = str(meta.get("version", ""))
    if version.startswith("adapters.") and config.get("architecture") == "lora" and config.get("r") != config.get("alpha"):
        try:
            old = Version(version[len("adapters."):]) < Version("1.1.0")
        except InvalidVersion:
            old = False
        if old:  # LoRA trained with the faulty scaling of adapters < 1.1.0 ran with alpha = r
            config["alpha"] = config["r"]
    return config


def _check_model(meta: Mapping, info: ModelInfo) -> None:
    model_type = meta.get("model_type")
    if model_type is not None and model_type != info.model_type:
        raise AdapterIncompatible(f"adapter was trained for model_type {model_type!r}, the base model is {info.model_type!r}")
    hidden = meta.get("hidden_size")
    if hidden is not None and hidden != info.hidden_size:
        raise AdapterIncompatible(f"adapter hidden_size is {hidden}, the base model's is {info.hidden_size}")


def read_adapterhub(directory: Path, info: ModelInfo, name: str | None = None) -> Adapter:
    """A `save_adapter()` directory -> `Adapter`, every tensor checked against `info`."""
    directory = Path(directory)
    meta = read_json(directory / "adapter_config.json")
    if not isinstance(meta.get("config"), Mapping):
        raise AdapterFormatError("adapter_config.json has no `config` object")
    _check_model(meta, info)
    if info.family not in LORA_MODULES:
        raise AdapterIncompatible(f"AdapterHub adapters are not supported for model family {info.family!r}")
    config = _fix_legacy_config(meta)
    weights = Weights(read_tensors(directory, WEIGHT_FILES), meta.get("name"), info)
    part = _merge(_read_parts(config, weights, info))
    weights.check_all_used()
    return Adapter(
        name=name or meta.get("name") or directory.name,
        format="adapterhub",
        method=part.method,
        config=meta,
        linear=part.linear,
        bottleneck=part.bottleneck,
        invertible=part.invertible,
        prefix=part.prefix,
        reft=part.reft,
        head=read_flex_head(directory, meta, info),
    )
