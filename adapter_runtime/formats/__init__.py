"""Readers for on-disk adapter formats. `load_adapter` detects the format and dispatches:
"adapterhub" (`save_adapter`), "adapterhub_fusion" (`save_adapter_fusion`), "peft".

Shared helpers here keep every reader strict in the same way: JSON and tensors are read
safely (safetensors, or `torch.load(weights_only=True)`, never unrestricted pickle), and
every failure is a typed error that names the file, key or option at fault. Poison is refused
at the door: JSON nested deeper than MAX_JSON_DEPTH, numbers that are NaN, infinite or beyond
float32's range (a 1e308 `lora_alpha`), tensors holding NaN or infinities, and scales or
weights that come out non-finite once the adapter is built.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from ..adapters import Adapter
from ..errors import AdapterFormatError, AdapterIncompatible, AdapterRuntimeError
from ..models.common import ModelInfo

log = logging.getLogger(__name__)

FORMATS = ("adapterhub", "adapterhub_fusion", "peft")
CONFIG_FILES = {"adapterhub_fusion": "adapter_fusion_config.json"}  # others: adapter_config.json
MAX_JSON_DEPTH = 32  # real adapter configs nest 5 levels or so
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise AdapterFormatError(f"missing file {path.name}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{path.name} is not valid JSON: {e}") from None
    except RecursionError:
        raise AdapterFormatError(f"{path.name} is nested too deeply (more than {MAX_JSON_DEPTH} levels)") from None
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path.name} must hold a JSON object")
    check_json_values(data, path.name)
    return data


def check_json_values(data, filename: str) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH (every later walk over the config stays
    shallow) and numbers that are NaN, infinite or beyond float32 (Python's json reads NaN,
    Infinity and 1e308). Iterative: no recursion on hostile input."""
    stack = [(data, "", 1)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise AdapterFormatError(f"{filename} is nested too deeply (more than {MAX_JSON_DEPTH} levels)")
        if isinstance(value, dict):
            stack.extend((v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value))
        elif isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise AdapterFormatError(f"{filename}: field {where or '(top)'} is {value!r}; adapter numbers must be "
                                     "finite and within float32 range")


def read_tensors(directory: Path, names: tuple[str, ...]) -> dict[str, Tensor]:
    """The first of `names` that exists in `directory`: .safetensors via safetensors, anything
    else via torch.load(weights_only=True), which refuses pickles that carry code."""
    for name in names:
        path = directory / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                tensors = load_file(str(path))
            else:
                tensors = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's message goes on to suggest weights_only=False: never show that advice
            detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "")
            raise AdapterFormatError(
                f"{name} was refused: it is a pickle that carries code or objects other than tensors, "
                f"and uploaded weights are never unpickled unrestricted. {detail}".strip()
            ) from None
        except Exception as e:  # truncated zip, bad safetensors header, ...
            raise AdapterFormatError(f"{name} cannot be read: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        if not isinstance(tensors, Mapping) or not all(isinstance(v, Tensor) for v in tensors.values()):
            raise AdapterFormatError(f"{name} must hold a flat mapping of names to tensors")
        tensors = {str(k): v.detach().float() if v.is_floating_point() else v for k, v in tensors.items()}
        for key, tensor in tensors.items():  # after the fp32 cast: a float64 1e308 is infinite here
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise AdapterFormatError(f"{name}: tensor {key} holds NaN or infinite values (in float32)")
        return tensors
    raise AdapterFormatError(f"missing weights file: expected one of {', '.join(names)}")


def expect_shape(key: str, tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Every tensor is checked against what the base model implies before it is accepted."""
    if tuple(tensor.shape) != tuple(shape):
        raise AdapterIncompatible(f"tensor {key} has shape {list(tensor.shape)}, the base model needs {list(shape)}")
    return tensor


def config_file(format: str) -> str:
    return CONFIG_FILES.get(format, "adapter_config.json")


def detect_format(directory: Path) -> str:
    from .adapterhub.fusion import is_fusion_dir

    if is_fusion_dir(directory):
        return "adapterhub_fusion"
    config = read_json(directory / "adapter_config.json")
    check_config_types(config)
    if "peft_type" in config:
        return "peft"
    if "config" in config and ("model_type" in config or "hidden_size" in config):
        return "adapterhub"
    raise AdapterFormatError("adapter_config.json is neither an AdapterHub (`config`, `model_type`) nor a PEFT (`peft_type`) config")


def check_config_types(config: dict) -> None:
    """The keys that choose a reader have the types the readers assume."""
    for key in ("peft_type", "model_type", "architecture"):
        if key in config and not isinstance(config[key], (str, type(None))):
            raise AdapterFormatError(f"adapter_config.json: {key} must be a string, got {type(config[key]).__name__}")
    if "config" in config and not isinstance(config["config"], (dict, str, type(None))):
        raise AdapterFormatError(f"adapter_config.json: config must be an object, got {type(config['config']).__name__}")


def load_adapter(directory: str | Path, info: ModelInfo, name: str | None = None, format: str | None = None) -> Adapter:
    """Read a saved adapter directory into an `Adapter` on the CPU in fp32, checked against `info`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFormatError(f"{directory.name} is not a directory")
    format = format or detect_format(directory)
    if format not in FORMATS:
        raise AdapterFormatError(f"unknown adapter format {format!r}; expected one of {', '.join(FORMATS)}")
    try:
        check_config_types(read_json(directory / config_file(format)))
        if format == "adapterhub":
            from .adapterhub import read_adapterhub

            adapter = read_adapterhub(directory, info, name)
        elif format == "adapterhub_fusion":
            from .adapterhub.fusion import read_fusion

            adapter = read_fusion(directory, info, name)
        else:
            from .peft import read_peft

            adapter = read_peft(directory, info, name)
    except AdapterRuntimeError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError, OverflowError) as e:
        # a config value of a type or range no reader expects: the upload's fault, whatever the reader tripped on
        log.warning("adapter %s refused: %s: %s", name, type(e).__name__, e, exc_info=True)
        raise AdapterFormatError(f"adapter_config.json or the weights hold a value of an unexpected type or range "
                                 f"({type(e).__name__}); check the config against its library's format") from None
    check_finite(adapter)
    return adapter


def check_finite(adapter: Adapter) -> None:
    """Scales derived from the config (LoRA alpha / r, bottleneck scaling) and every tensor
    of the built adapter (an evaluated prefix MLP included) are finite in float32."""
    from ..adapters import Bottleneck, LoRA

    for (layer, module), effect in adapter.linear.items():
        if isinstance(effect, LoRA) and not (math.isfinite(effect.scale) and abs(effect.scale) <= FLOAT32_MAX):
            raise AdapterFormatError(f"the LoRA scale at layer {layer} {module} is {effect.scale!r} (lora_alpha / r): "
                                     "it must be finite and within float32 range")
    for (layer, where), b in adapter.bottleneck.items():
        if isinstance(b, Bottleneck) and isinstance(b.scaling, float) and not (
                math.isfinite(b.scaling) and abs(b.scaling) <= FLOAT32_MAX):
            raise AdapterFormatError(f"the bottleneck scaling at layer {layer} {where} is {b.scaling!r}: it must be "
                                     "finite and within float32 range")
    for tensor in adapter.tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.float()).all()):
            raise AdapterFormatError("the adapter's weights are not finite once built (NaN or infinite values)")
