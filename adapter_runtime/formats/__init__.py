"""Readers for on-disk adapter formats. `load_adapter` detects the format and dispatches.

Shared helpers here keep every reader strict in the same way: JSON and tensors are read
safely (safetensors, or `torch.load(weights_only=True)`, never unrestricted pickle), and
every failure is a typed error that names the file, key or option at fault.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from ..adapters import Adapter
from ..errors import AdapterFormatError, AdapterIncompatible
from ..models.common import ModelInfo

FORMATS = ("adapterhub", "peft")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise AdapterFormatError(f"missing file {path.name}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{path.name} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path.name} must hold a JSON object")
    return data


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
        return {str(k): v.detach().float() if v.is_floating_point() else v for k, v in tensors.items()}
    raise AdapterFormatError(f"missing weights file: expected one of {', '.join(names)}")


def expect_shape(key: str, tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Every tensor is checked against what the base model implies before it is accepted."""
    if tuple(tensor.shape) != tuple(shape):
        raise AdapterIncompatible(f"tensor {key} has shape {list(tensor.shape)}, the base model needs {list(shape)}")
    return tensor


def detect_format(directory: Path) -> str:
    config = read_json(directory / "adapter_config.json")
    if "peft_type" in config:
        return "peft"
    if "config" in config and ("model_type" in config or "hidden_size" in config):
        return "adapterhub"
    raise AdapterFormatError("adapter_config.json is neither an AdapterHub (`config`, `model_type`) nor a PEFT (`peft_type`) config")


def load_adapter(directory: str | Path, info: ModelInfo, name: str | None = None, format: str | None = None) -> Adapter:
    """Read a saved adapter directory into an `Adapter` on the CPU in fp32, checked against `info`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFormatError(f"{directory} is not a directory")
    format = format or detect_format(directory)
    if format == "adapterhub":
        from .adapterhub import read_adapterhub

        return read_adapterhub(directory, info, name)
    if format == "peft":
        from .peft import read_peft

        return read_peft(directory, info, name)
    raise AdapterFormatError(f"unknown adapter format {format!r}; expected one of {', '.join(FORMATS)}")
