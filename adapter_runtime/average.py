"""AdapterHub's `average_adapter`: a new adapter whose weights combine stored adapters' weights,
computed the way `adapters` 1.3.0 does (model_mixin.average_adapter and the per-layer
average_adapter of each method). Works on the files in the store: every tensor of the saved
adapter is a module parameter the library averages, so the combination is key by key.

    weights   None -> 1/N each; given -> w / sum(w) when normalize_weights (a zero sum is refused)
    linear                      every tensor: sum_i w_i t_i. LoRA's A and B are averaged
                                separately, not the deltas; bottlenecks, prefixes (in the flat form
                                the store keeps), NICE, PHM and VeRA's shared matrices alike
    lora_linear_only_negate_b   LoRA tensors only: A = sum_i |w_i| A_i, B = sum_i w_i B_i
    lora_delta_w_svd            plain LoRA only: dW = sum_i w_i B_i A_i (without alpha/r), then
                                the top svd_rank singular triplets: A = V_k, B = U_k S_k; the new
                                config has r = svd_rank and keeps alpha, so its scale is alpha/svd_rank

The library averages no invertible (NICE) adapter on the model classes that produce logits
(GPT2LMHeadModel, LlamaForCausalLM, the *AdapterModel flex classes: `average_adapter` checks the
class with the heads, which is not the one that holds the invertible adapters). The new adapter
therefore has none, although its config still names one; we do the same.

Every case the library refuses (configs that differ other than in dropout/init_weights, a
strategy a method does not support, an SVD on GPT-2, ...) raises InvalidRequest naming it.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .errors import InvalidRequest
from .formats import read_json, read_tensors
from .formats.adapterhub.keys import BASE_PREFIXES, NAME_CONTAINERS, WEIGHT_FILES, Weights, legacy_key

COMBINE_STRATEGIES = ("linear", "lora_linear_only_negate_b", "lora_delta_w_svd")
# config keys the library ignores when it checks that the adapters share one configuration
CONFIG_HASH_IGNORE = ("dropout", "init_weights")
# defaults the library's config hash drops (utils.ADAPTER_CONFIG_HASH_IGNORE_DEFAULT)
CONFIG_HASH_IGNORE_DEFAULT = {
    "phm_layer": True, "phm_dim": 4, "factorized_phm_W": True, "shared_W_phm": False, "shared_phm_rule": True,
    "factorized_phm_rule": False, "phm_c_init": "normal", "phm_init_range": 0.0001, "learn_phm": True,
    "hypercomplex_nonlinearity": "glorot-uniform", "phm_rank": 1, "phm_bias": True,
}
# model types whose adapters-library mixin sets support_lora_delta_w_svd = False
NO_SVD_MODEL_TYPES = ("gpt2",)
NEW = "{name}"  # placeholder for the adapter name inside canonical keys


@dataclass(frozen=True)
class Source:
    """One stored AdapterHub adapter: its adapter_config.json and its tensors as saved."""

    name: str  # the name it is served under
    meta: Mapping
    tensors: Mapping[str, Tensor]


def read_source(directory: Path, name: str) -> Source:
    """A saved AdapterHub adapter directory (a store folder) as a Source."""
    return Source(name, read_json(directory / "adapter_config.json"), read_tensors(directory, WEIGHT_FILES))


def write_adapter(directory: Path, meta: Mapping, tensors: Mapping[str, Tensor]) -> None:
    """Save like the library's save_adapter: adapter_config.json and adapter.safetensors."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    save_file(dict(tensors), str(directory / "adapter.safetensors"), metadata={"format": "pt"})


def normalized_weights(n: int, weights: Sequence[float] | None, normalize: bool) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise InvalidRequest(f"weights has {len(weights)} entries for {n} adapters")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise InvalidRequest("weights must be finite numbers")
    if not normalize:
        return [float(w) for w in weights]
    total = sum(weights)
    if total == 0:
        raise InvalidRequest("weights sum to 0: with normalize_weights the library divides by their sum")
    return [w / total for w in weights]


def config_signature(config: Mapping) -> dict:
    """What the library's get_adapter_config_hash(config, ignore_params=[dropout, init_weights])
    compares: top-level keys minus the ignored ones, falsy values dropped (recursively in
    mappings), and some defaults removed."""

    def minimize(d):
        return {k: minimize(v) for k, v in d.items() if v} if isinstance(d, Mapping) else d

    sig = minimize({k: v for k, v in config.items() if k not in CONFIG_HASH_IGNORE})
    return {k: v for k, v in sig.items() if not (k in CONFIG_HASH_IGNORE_DEFAULT and CONFIG_HASH_IGNORE_DEFAULT[k] == v)}


def canonical_tensors(source: Source) -> dict[str, Tensor]:
    """Keys without the base-model prefix and with the adapter name replaced by NEW, so that
    the same parameter of different adapters has the same key."""
    name = Weights._adapter_name(source.tensors, source.meta.get("name"))
    pattern = re.compile(rf"(^|\.)({NAME_CONTAINERS})\.{re.escape(name)}\.")
    out = {}
    for key, t in source.tensors.items():
        k = legacy_key(key)
        for prefix in BASE_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        k, found = pattern.subn(rf"\1\2.{NEW}.", k, count=1)
        if not found:
            raise InvalidRequest(f"adapter {source.name!r}: weight key {key} does not carry its adapter name")
        out[k] = t
    return out


def check_strategy(config: Mapping, strategy: str, svd_rank: int | None, model_type: str) -> None:
    if strategy not in COMBINE_STRATEGIES:
        raise InvalidRequest(f"combine_strategy {strategy!r} is not one of {', '.join(COMBINE_STRATEGIES)}")
    if svd_rank is not None and strategy != "lora_delta_w_svd":
        raise InvalidRequest("svd_rank is only used by combine_strategy 'lora_delta_w_svd' (the library would set "
                             "the new LoRA's r to it and fail to load the averaged weights)")
    if strategy == "linear":
        return
    arch = config.get("architecture")
    if arch == "union":
        raise InvalidRequest(f"combine_strategy {strategy!r}: adapters with a ConfigUnion are only averaged 'linear'")
    if arch not in ("lora", "mtl_lora"):
        raise InvalidRequest(f"combine_strategy {strategy!r} is only for LoRA adapters; these are "
                             f"{arch or 'bottleneck'} adapters (use 'linear')")
    if isinstance(config.get("vera_d"), float) or isinstance(config.get("vera_b"), float):
        raise InvalidRequest("VeRA adapters only support combine_strategy 'linear'")
    if strategy == "lora_delta_w_svd":
        if model_type in NO_SVD_MODEL_TYPES:
            raise InvalidRequest(f"combine_strategy 'lora_delta_w_svd' is not supported by the library for "
                                 f"{model_type} models")
        if svd_rank is None:
            raise InvalidRequest("combine_strategy 'lora_delta_w_svd' needs svd_rank")
        if isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0:
            raise InvalidRequest(f"svd_rank must be a positive integer, got {svd_rank!r}")
        if config.get("composition_mode", "add") != "add" or arch != "lora" or config.get("use_dora") \
                or config.get("use_gating"):
            raise InvalidRequest("combine_strategy 'lora_delta_w_svd' needs plain LoRA adapters (not IA3, DoRA, "
                                 "gated or MTL-LoRA: the library cannot load the SVD factors into them)")


def average(sources: Sequence[Source], new_name: str, weights: Sequence[float] | None = None,
            combine_strategy: str = "linear", normalize_weights: bool = True, svd_rank: int | None = None,
            ) -> tuple[dict, dict[str, Tensor]]:
    """(adapter_config.json, tensors) of the averaged adapter named `new_name`."""
    if not sources:
        raise InvalidRequest("average needs at least one adapter")
    first = sources[0]
    config = first.meta.get("config")
    if not isinstance(config, Mapping):
        raise InvalidRequest(f"adapter {first.name!r} has no AdapterHub config")
    for s in sources[1:]:
        if config_signature(s.meta.get("config") or {}) != config_signature(config):
            raise InvalidRequest(f"adapters {first.name!r} and {s.name!r} have different configurations; the library "
                                 "averages only adapters of one configuration (dropout and init_weights aside)")
        for field in ("model_type", "hidden_size"):
            if s.meta.get(field) != first.meta.get(field):
                raise InvalidRequest(f"adapters {first.name!r} and {s.name!r} were saved for different models "
                                     f"({field} {first.meta.get(field)!r} vs {s.meta.get(field)!r})")
    check_strategy(config, combine_strategy, svd_rank, str(first.meta.get("model_type")))
    w = normalized_weights(len(sources), weights, normalize_weights)

    tensors = [{k: v for k, v in canonical_tensors(s).items() if not k.startswith("invertible_adapters.")}
               for s in sources]
    for s, t in zip(sources[1:], tensors[1:]):
        if t.keys() != tensors[0].keys():
            odd = sorted(t.keys() ^ tensors[0].keys())[0].replace(NEW, "<name>")
            raise InvalidRequest(f"adapters {first.name!r} and {s.name!r} hold different tensors (e.g. {odd})")
        for k, v in t.items():
            if v.shape != tensors[0][k].shape:
                raise InvalidRequest(f"tensor {k.replace(NEW, '<name>')} has shape {list(v.shape)} in {s.name!r} "
                                     f"and {list(tensors[0][k].shape)} in {first.name!r}")

    if combine_strategy == "linear":
        combined = {k: weighted_sum([t[k] for t in tensors], w) for k in tensors[0]}
    elif combine_strategy == "lora_linear_only_negate_b":
        combined = {}
        for k in tensors[0]:
            if k.endswith(".lora_A"):
                combined[k] = weighted_sum([t[k] for t in tensors], [abs(x) for x in w])
            elif k.endswith(".lora_B"):
                combined[k] = weighted_sum([t[k] for t in tensors], w)
            else:
                raise InvalidRequest(f"combine_strategy 'lora_linear_only_negate_b' averages lora_A and lora_B only; "
                                     f"these adapters also hold {parameter(k)!r} ({k.replace(NEW, '<name>')})")
    else:
        combined = svd_average(tensors, w, svd_rank)

    meta = copy.deepcopy(dict(first.meta))
    meta.pop("config_id", None)  # a hash of the config the new adapter may not share
    meta["name"] = new_name
    if combine_strategy == "lora_delta_w_svd":
        meta["config"]["r"] = svd_rank
    prefix = next((p for p in BASE_PREFIXES if any(k.startswith(p) for k in first.tensors)), "")
    return meta, {prefix + k.replace(NEW, new_name): v.contiguous() for k, v in combined.items()}


def parameter(key: str) -> str:
    """The parameter's name inside its adapter module: "layers.0.q_proj.loras.{name}.m.weight" -> "m.weight"."""
    return key.split(f".{NEW}.", 1)[-1]


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """sum_i w_i t_i in fp32, accumulated in order like the library's state-dict loop."""
    total = weights[0] * tensors[0].float()
    for w, t in zip(weights[1:], tensors[1:]):
        total = total + w * t.float()
    return total


def svd_average(tensors: Sequence[Mapping[str, Tensor]], weights: Sequence[float], svd_rank: int) -> dict[str, Tensor]:
    """Per LoRA module: dW = sum_i w_i (B_i @ A_i) [out, in] (no alpha/r), U S V = svd(dW),
    A = V[:k], B = U[:, :k] diag(S[:k]) with k = svd_rank (LoRALayer._average_adapter_lora_delta_w_svd)."""
    out = {}
    for key in tensors[0]:
        if key.endswith(".lora_B"):
            continue
        if not key.endswith(".lora_A"):
            raise InvalidRequest(f"combine_strategy 'lora_delta_w_svd' needs plain LoRA adapters; these also hold "
                                 f"{parameter(key)!r} ({key.replace(NEW, '<name>')})")
        module = key[: -len(".lora_A")]
        deltas = torch.stack([t[module + ".lora_B"].float() @ t[key].float() for t in tensors])  # [n, out, in]
        delta = (deltas * torch.tensor(list(weights), dtype=torch.float32).view(-1, 1, 1)).sum(dim=0)
        if svd_rank > min(delta.shape):
            raise InvalidRequest(f"svd_rank {svd_rank} is larger than the {delta.shape[0]}x{delta.shape[1]} delta of "
                                 f"{module.replace(NEW, '<name>')} allows (at most {min(delta.shape)})")
        U, S, V = torch.linalg.svd(delta)
        out[key] = V[:svd_rank, :].contiguous()
        out[module + ".lora_B"] = (U[:, :svd_rank] @ torch.diag(S[:svd_rank])).contiguous()
    return out
