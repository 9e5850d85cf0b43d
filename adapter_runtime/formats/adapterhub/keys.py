"""The key grammar of AdapterHub `adapters` 1.3.0 weight files: what a saved tensor's name says
(base-model prefix, layer, module container, adapter name) and the legacy names the library
still renames at load. Readers see the file's tensors under normalized keys through `Weights`.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from torch import Tensor

from ...errors import AdapterFormatError, AdapterIncompatible
from ...models.common import ModelInfo
from .. import expect_shape

WEIGHT_FILES = ("adapter.safetensors", "pytorch_adapter.bin")
BASE_PREFIXES = ("transformer.", "model.")  # GPT2LMHeadModel / LlamaForCausalLM; bare models: none
LAYER_KEY = re.compile(r"^(?:h|layers)\.(\d+)\.(.*)$")
# the adapter name follows one of these module containers in every key
NAME_CONTAINERS = ("adapters|loras|prefix_tunings|invertible_adapters|shared_parameters|prefix_gates|prompt_tunings|"
                   "refts|adapter_fusion_layer")
NAME_IN_KEY = re.compile(rf"(^|\.)({NAME_CONTAINERS})\.([^.]+)\.")
# adapter-transformers v1 key names that the library still renames at load
LEGACY_KEY_NAMES = {
    "attention_text_task_adapters": "adapters",
    "attention_text_lang_adapters": "adapters",
    "layer_text_task_adapters": "adapters",
    "layer_text_lang_adapters": "adapters",
    "invertible_lang_adapters": "invertible_adapters",
}
PREFIX_ALIAS = "prefix_tuning.pool.prefix_tunings."  # per-layer copies of the canonical prefix

# ----------------------------------------------------------------------------- tensors of a file


class Weights:
    """The file's tensors under normalized keys: "{layer}.{path}" or a global "{path}", with the
    base prefix and the adapter name removed. Readers `take` what the config implies; whatever
    nobody took is an error (`check_all_used`)."""

    def __init__(self, tensors: Mapping[str, Tensor], name: str | None, info: ModelInfo):
        self.tensors: dict[str, Tensor] = {}
        self.original: dict[str, str] = {}  # normalized key -> key in the file, for messages
        self.used: set[str] = set()
        name = self._adapter_name(tensors, name)
        for key, t in tensors.items():
            norm = self._normalize(key, name, info)
            if norm is not None:
                self.tensors[norm] = t
                self.original[norm] = key

    @staticmethod
    def _adapter_name(tensors: Mapping[str, Tensor], name: str | None) -> str:
        """The config's `name` if the keys carry it, else the one name all keys agree on."""
        found = {m.group(3) for k in tensors if (m := NAME_IN_KEY.search(legacy_key(k)))}
        if name in found or not found:
            return name or ""
        if len(found) == 1:
            return found.pop()
        raise AdapterFormatError(f"weight keys name several adapters ({', '.join(sorted(found))}), none is {name!r}")

    @staticmethod
    def _normalize(key: str, name: str, info: ModelInfo) -> str | None:
        k = legacy_key(key)
        for prefix in BASE_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        if PREFIX_ALIAS in k:  # same storage as the canonical prefix (§1.3): ignore
            return None
        k, found = re.subn(rf"(^|\.)({NAME_CONTAINERS})\.{re.escape(name)}\.", r"\1\2.", k, count=1)
        if not found:
            raise AdapterFormatError(f"weight key {key} does not belong to adapter {name!r}")
        if m := LAYER_KEY.match(k):
            layer = int(m.group(1))
            if layer >= info.num_layers:
                raise AdapterIncompatible(f"weight key {key} is for layer {layer}, the base model has {info.num_layers} layers")
            return f"{layer}.{m.group(2)}"
        return k

    def has(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str, shape: Sequence[int]) -> Tensor:
        if key not in self.tensors:
            raise AdapterFormatError(f"missing tensor {key!r} (expected shape {list(shape)}) in the weights file")
        self.used.add(key)
        return expect_shape(self.original[key], self.tensors[key], tuple(shape))

    def take_if(self, present: bool, key: str, shape: Sequence[int]) -> Tensor | None:
        return self.take(key, shape) if present else None

    def check_all_used(self) -> None:
        unused = sorted(self.original[k] for k in self.tensors.keys() - self.used)
        if unused:
            more = f" (and {len(unused) - 3} more)" if len(unused) > 3 else ""
            raise AdapterFormatError(f"weights file holds tensors the config does not explain: {', '.join(unused[:3])}{more}")


def legacy_key(key: str) -> str:
    for old, new in LEGACY_KEY_NAMES.items():
        key = key.replace(old, new)
    return key


