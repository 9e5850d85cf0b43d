"""Named adapters, already on the model's device and dtype, and how a request names them.

For now an in-memory map; the on-disk store and host/device caches come later behind the
same small interface (`register`, `get`, `resolve`, `names`).
"""

from __future__ import annotations

import threading
from typing import Sequence

import torch

from .adapters import Adapter
from .batch import Setup
from .errors import AdapterConflict, AdapterNotFound, InvalidRequest


class AdapterRegistry:
    def __init__(self, base_name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.base_name = base_name  # the name under which requests get the bare base model
        self.device = torch.device(device)
        self.dtype = dtype
        self._adapters: dict[str, Adapter] = {}
        self._lock = threading.Lock()

    def register(self, name: str, adapter: Adapter) -> Adapter:
        """Move `adapter` to the model's device/dtype and store it under `name`."""
        if name == self.base_name:
            raise AdapterConflict(f"adapter name {name!r} is the base model's name")
        moved = adapter.to(self.device, self.dtype)
        with self._lock:
            if name in self._adapters:
                raise AdapterConflict(f"an adapter named {name!r} is already registered")
            self._adapters[name] = moved
        return moved

    def get(self, name: str) -> Adapter:
        try:
            return self._adapters[name]
        except KeyError:
            raise AdapterNotFound(f"model or adapter {name!r} not found; available: {', '.join(self.models())}") from None

    def names(self) -> list[str]:
        return sorted(self._adapters)

    def models(self) -> list[str]:
        """Everything a request may put in `model`: the base model, then the adapters."""
        return [self.base_name, *self.names()]

    def resolve(self, model: str, stack: Sequence[str] | None = None) -> Setup:
        """The adapter setup of a request.

        model       the base model's name (no adapter) or one adapter's name
        stack       optional explicit stack of adapter names, applied in order; `model` must
                    then be the base model or one of the stack's names
        """
        if stack is None:
            return () if model == self.base_name else (self.get(model),)
        if model != self.base_name and model not in stack:
            self.get(model)  # 404 for an unknown name, else the mismatch below
            raise InvalidRequest(f"model {model!r} must be the base model {self.base_name!r} or one of adapters {list(stack)}")
        if len(set(stack)) != len(stack):
            raise InvalidRequest(f"adapters must not repeat a name: {list(stack)}")
        setup = tuple(self.get(name) for name in stack)
        if len(setup) > 1:
            from .formats.adapterhub import validate_stack

            validate_stack(setup)  # only combinations whose Stack semantics we implement
        return setup
