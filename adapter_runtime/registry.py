"""Named adapters in three tiers, and how a request names them.

    disk    every adapter of the store (`store.py`); only its metadata is in memory
    host    fp32 CPU `Adapter`s, LRU, bounded by `host_cache_bytes`
    device  `Adapter`s on the model's device and dtype, LRU, bounded by `device_cache_adapters`
            and `device_cache_bytes`

A request `acquire`s its adapters on the request thread (loading from disk or host happens
there, never on the engine worker) and each acquired adapter is *pinned* until the engine
`release`s it when the request finishes, fails or is cancelled. Pinned adapters are never
evicted. When every device entry is pinned and another adapter is needed, the device tier
overflows its limits for a while instead of blocking (no deadlock); the extra entries go as
soon as their requests finish.

Adapters given as objects (`register`, e.g. `--adapter NAME=DIR` at startup) have no store
copy: they stay on the device for good and do not count against the budgets.

DELETE removes the name at once (new requests get 404). Requests already holding the adapter
keep their reference to its tensors and finish normally; the memory is freed after them. The
adapter merged into the base weights (`mark_merged`) cannot be deleted: the check and the
delete are one step under the registry's lock, so a merge racing a delete ends either merged
(and the delete refused, 409) or deleted (and the merge refused, 404), never both.

Stored adapters made for another base model (`AdapterStore.foreign`) are not served: a request
naming one gets 422, and its name cannot be taken (409), both naming the two models.

A store shared with other servers (the replicas of a cluster, server/cluster/) sets `shared`:
then every lookup first checks the adapter's meta.json on disk (one stat while nothing changed)
and every listing the store folder's mtime, so that what another server deleted answers 404
here at once and what it added is servable here right away (`refresh`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .adapters import Adapter
from .batch import Setup
from .composition import RowRequest, Spec, build_row, row_setup, validate_stack, validate_tree
from .errors import AdapterConflict, AdapterIncompatible, AdapterNotFound, AdapterRuntimeError, InvalidRequest, brief
from .formats.adapterhub.fusion import fused_adapter_names
from .methods.compose import STACK
from .store import AdapterStore, StoredAdapter, check_name

log = logging.getLogger(__name__)
# cache observer: (event, tier, seconds); events "hit" | "miss" | "load" | "evict", tiers "device" | "host" | "disk"
CacheObserver = Callable[[str, str, float], None]


@dataclass(frozen=True)
class CacheLimits:
    device_adapters: int = 16
    device_bytes: int | None = None  # None = no byte limit, only the count
    host_bytes: int | None = 1 << 30


@dataclass(frozen=True)
class AdapterStatus:
    """One adapter as `GET /v1/adapters` shows it."""

    name: str
    format: str
    method: str
    parameters: int
    bytes: int
    location: str  # "disk" | "host" | "device"
    pinned: bool
    requests_served: int
    created: int


class _Lru:
    """An LRU map name -> Adapter with a byte total; eviction skips pinned names."""

    def __init__(self):
        self.items: OrderedDict[str, Adapter] = OrderedDict()
        self.bytes = 0

    def get(self, name: str) -> Adapter | None:
        if name in self.items:
            self.items.move_to_end(name)
            return self.items[name]
        return None

    def put(self, name: str, adapter: Adapter) -> Adapter:
        if name in self.items:
            return self.get(name)
        self.items[name] = adapter
        self.bytes += adapter.nbytes
        return adapter

    def pop(self, name: str) -> None:
        adapter = self.items.pop(name, None)
        if adapter is not None:
            self.bytes -= adapter.nbytes

    def evict(self, over, pinned: Counter) -> int:
        """Drop least recently used unpinned entries while `over(self)` holds; return how many."""
        dropped = 0
        for name in list(self.items):
            if not over(self):
                break
            if not pinned[name]:
                self.pop(name)
                dropped += 1
        return dropped


class AdapterRegistry:
    def __init__(self, base_name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 store: AdapterStore | None = None, limits: CacheLimits = CacheLimits(),
                 observer: CacheObserver | None = None):
        self.base_name = base_name  # the name under which requests get the bare base model
        self.device = torch.device(device)
        self.dtype = dtype
        self._lock = threading.Lock()
        self._static: dict[str, Adapter] = {}  # registered objects, on the device for good
        self._stored: dict[str, StoredAdapter] = {}  # everything in the store
        self._writing: set[str] = set()  # names being uploaded right now
        self._host, self._device = _Lru(), _Lru()
        self._loading: dict[str, Future] = {}  # name -> the load in progress (single flight)
        self._pins: Counter[str] = Counter()
        self._served: Counter[str] = Counter()
        self._foreign: dict[str, str] = {}  # stored for another base model: name -> why not served
        self._merged: tuple[str, str] | None = None  # (name, uid) of the adapter merged into the base weights
        self.store: AdapterStore | None = None
        self.limits = limits
        self.observer = observer  # e.g. the server's metrics
        self.shared = False  # other servers write the store too: re-validate against it (`refresh`)
        self._seen: dict[str, tuple | None] = {}  # name -> meta.json signature when last read
        self._generation: int | None = None  # the store folder's mtime at the last full refresh
        if store is not None:
            self.attach(store, limits)

    def attach(self, store: AdapterStore, limits: CacheLimits) -> None:
        """Serve every adapter of `store` (read at once), with these cache limits."""
        stored = {m.name: m for m in store.scan() if m.name != self.base_name}
        seen = {name: meta_signature(store.path(name)) for name in stored}
        with self._lock:
            self.store, self.limits = store, limits
            self._stored.update(stored)
            self._seen.update(seen)
            self._foreign.update(store.foreign)

    # ------------------------------------------------------------------ adding and removing
    def register(self, name: str, adapter: Adapter) -> Adapter:
        """Move `adapter` to the model's device/dtype and keep it under `name` (not stored)."""
        moved = adapter.to(self.device, self.dtype)
        with self._lock:
            self._check_free(name)
            self._static[name] = moved
        return moved

    def check_free(self, name: str) -> None:
        """Raise what adding `name` now would raise (invalid name, the base model's name, taken)."""
        check_name(name)
        self.refresh(name)
        with self._lock:
            self._check_free(name)

    def _check_free(self, name: str) -> None:  # holding the lock
        if name == self.base_name:
            raise AdapterConflict(f"adapter name {name!r} is the base model's name; choose another name")
        if name in self._foreign:
            raise AdapterConflict(f"the name {name!r} is taken in the store: {self._foreign[name]}")
        if name in self._static or name in self._stored or name in self._writing:
            raise AdapterConflict(f"an adapter named {name!r} is already registered")

    def add(self, name: str, directory, format: str | None = None) -> AdapterStatus:
        """Validate the adapter directory against the base model and store it as `name`."""
        if self.store is None:
            raise InvalidRequest("this server has no adapter store")
        check_name(name)
        self.refresh(name)
        with self._lock:
            self._check_free(name)
            self._writing.add(name)
        try:
            meta, adapter = self.store.add(name, directory, format)
            signature = meta_signature(self.store.path(name))
            with self._lock:
                self._stored[name] = meta
                self._seen[name] = signature
                self._host.put(name, adapter)
                self._evict()
        finally:
            with self._lock:
                self._writing.discard(name)
        return self.status(name)

    def delete(self, name: str) -> None:
        """Forget `name` now; requests that hold it finish with their own reference."""
        self.refresh(name)
        with self._lock:
            if self._merged is not None and self._merged[0] == name:
                raise AdapterConflict(f"adapter {name!r} is merged into the base weights; reset before deleting it")
            if name in self._foreign:
                raise AdapterConflict(f"{self._foreign[name]}; delete it from a server running that model")
            if name in self._static:
                del self._static[name]
                stored = None
            elif name in self._stored:
                stored = self._stored.pop(name)
            else:
                raise self._not_found(name)
            self._host.pop(name)
            self._device.pop(name)
            self._pins.pop(name, None)
            self._served.pop(name, None)
            self._seen.pop(name, None)
        if stored is not None:
            self.store.delete(name)

    # ------------------------------------------------------------------ lookups
    def names(self) -> list[str]:
        self.refresh_all()
        with self._lock:
            return sorted([*self._static, *self._stored])

    def models(self) -> list[str]:
        """Everything a request may put in `model`: the base model, then the adapters."""
        return [self.base_name, *self.names()]

    def _not_found(self, name: str) -> AdapterNotFound | AdapterIncompatible:  # holding the lock
        if name in self._foreign:
            return AdapterIncompatible(self._foreign[name])
        names = [self.base_name, *sorted([*self._static, *self._stored])]
        shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
        return AdapterNotFound(f"model or adapter {brief(name)} not found; available: {shown}")

    # ------------------------------------------------------------------ merge guard
    def mark_merged(self, name: str, adapter: Adapter) -> None:
        """Record that `adapter` is being merged as `name`; from now on `delete(name)` is
        refused. Raises AdapterNotFound if `name` no longer holds this adapter (deleted or
        replaced since the merge was asked for): then nothing may be merged."""
        with self._lock:
            current = self._static.get(name) or self._stored.get(name)
            if current is None or current.uid != adapter.uid:
                raise AdapterNotFound(f"adapter {name!r} was deleted or replaced before the merge could run; "
                                      "nothing was merged")
            if self._merged is not None:
                raise AdapterConflict(f"adapter {self._merged[0]!r} is merged; reset it before merging {name!r}")
            self._merged = (name, adapter.uid)

    def clear_merged(self) -> None:
        with self._lock:
            self._merged = None

    def get(self, name: str, pin: bool = False) -> Adapter:
        """The adapter on the model's device, loaded from host or disk if needed. Concurrent
        requests for the same uncached adapter load it once: the others wait for that load."""
        self.refresh(name)
        while True:
            with self._lock:
                found = self._static.get(name) or self._device.get(name)
                meta = self._stored.get(name)
                if found is None and meta is None:
                    raise self._not_found(name)
                if found is not None:
                    self._pins.update([name] * pin)
                    self._observe("hit", "device")
                    return found
                pending = self._loading.get(name)
                if pending is None:  # this thread loads it
                    pending = self._loading[name] = Future()
                    host = self._host.get(name)
                    break
            pending.result()  # another thread is loading it (re-raises its error); look again
        try:
            self._observe("miss", "device")
            self._observe("hit" if host is not None else "miss", "host")
            source, start = ("host" if host is not None else "disk"), time.perf_counter()
            if host is None:
                host = self.store.load(meta)  # disk -> CPU fp32, outside the lock
            on_device = host.to(self.device, self.dtype)
            self._observe("load", source, time.perf_counter() - start)
            with self._lock:
                self._loading.pop(name, None)
                if self._stored.get(name) is not meta:  # deleted (or replaced) while loading
                    raise self._not_found(name)
                self._host.put(name, host)
                found = self._device.put(name, on_device)
                self._pins.update([name] * pin)
                self._evict()
        except BaseException as e:
            with self._lock:
                self._loading.pop(name, None)
            pending.set_exception(e)
            raise
        pending.set_result(None)
        return found

    def _observe(self, event: str, tier: str, seconds: float = 0.0) -> None:
        if self.observer is None:
            return
        try:
            self.observer(event, tier, seconds)
        except Exception:  # an observer never breaks a lookup
            log.exception("cache observer failed")

    def _evict(self) -> None:  # holding the lock
        lim = self.limits
        dropped = self._device.evict(lambda c: len(c.items) > lim.device_adapters
                                     or (lim.device_bytes is not None and c.bytes > lim.device_bytes), self._pins)
        for _ in range(dropped):
            self._observe("evict", "device")
        if lim.host_bytes is not None:
            for _ in range(self._host.evict(lambda c: c.bytes > lim.host_bytes, self._pins)):
                self._observe("evict", "host")

    # ------------------------------------------------------------------ requests
    def resolve(self, model: str, stack=None, pin: bool = False) -> Setup:
        """The adapter setup of one engine row.

        model       the base model's name (no adapter), one adapter's name, or a stored
                    fusion's name (Fuse of the adapters it was made for)
        stack       optional: a list of adapter names (a Stack, applied in order), or a
                    composition (composition.py: the request's object, or one row of it as a
                    `RowRequest`); `model` must then be the base model or one of its names
        pin         pin every adapter the row holds (the caller must `release` it)
        """
        row = None
        if stack is None:
            names = [] if model == self.base_name else [model]
        else:
            if not isinstance(stack, (list, tuple)):
                row = stack if isinstance(stack, RowRequest) else RowRequest(stack)
            names = list(row) if row is not None else list(stack)
            if model != self.base_name and model not in names:
                self.get(model)  # 404 for an unknown name, else the mismatch below
                raise InvalidRequest(f"model {model!r} must be the base model {self.base_name!r} or one of adapters {names}")
            if row is None and len(set(stack)) != len(stack):
                raise InvalidRequest(f"adapters must not repeat a name: {list(stack)}")
        got: list[Adapter] = []  # every adapter fetched (and pinned, with `pin`), once per use

        def get(name: str) -> Adapter:
            got.append(self.get(name, pin=pin))
            return got[-1]

        try:
            if row is None:
                setup = tuple(get(name) for name in names)
                if not any(a.fusion is not None for a in setup):
                    validate_stack(setup)  # only combinations whose Stack semantics we implement
                    return setup
                spec = Spec(STACK, tuple(names))  # a stored fusion's name in a stack: Fuse of its adapters
                for _ in setup:
                    got.pop()  # fetched again below, in their places in the tree
                if pin:
                    self.release(setup, served=False)
            else:
                spec = row.spec
            root = build_row(spec, row, get, lambda fused: get(self.find_fusion(fused)))
            validate_tree(root)
            setup = row_setup(root)
            if pin:  # keep the pins of what the row holds, give back the rest
                extra = Counter(a.name for a in got) - Counter(a.name for a in getattr(setup, "pinned", setup))
                surplus = []
                for a in got:
                    if extra[a.name] > 0:
                        extra[a.name] -= 1
                        surplus.append(a)
                self.release(surplus, served=False)
            return setup
        except BaseException:
            if pin:
                self.release(got, served=False)
            raise

    def find_fusion(self, names: Sequence[str]) -> str:
        """The stored (or registered) AdapterFusion made for exactly these adapters, in order."""
        self.refresh_all()
        with self._lock:
            candidates = [n for n, m in self._stored.items() if m.format == "adapterhub_fusion"] + \
                         [n for n, a in self._static.items() if a.fusion is not None]
        matches = [name for name in sorted(candidates) if self._fused_names(name) == tuple(names)]
        if not matches:
            raise InvalidRequest(f"no AdapterFusion of adapters {list(names)} is stored here: upload the fusion the "
                                 "library saved (save_adapter_fusion), or name one with \"name\"", param="adapters")
        if len(matches) > 1:
            raise InvalidRequest(f"several fusions fuse {list(names)} ({', '.join(matches)}): choose one with \"name\"",
                                 param="adapters")
        return matches[0]

    def _fused_names(self, name: str) -> tuple[str, ...] | None:
        """What fusion `name` fuses, without loading it (a lookup must not fill the caches with
        every stored fusion); None when it is gone or unreadable."""
        with self._lock:
            static = self._static.get(name)
        if static is not None:
            return tuple(static.fusion.adapter_names)
        try:
            return fused_adapter_names(self.store.path(name))
        except (OSError, AdapterRuntimeError):
            return None

    def acquire(self, model: str, stack=None) -> Setup:
        """`resolve` with every adapter pinned until `release`."""
        return self.resolve(model, stack, pin=True)

    def release(self, setup: Setup, served: bool = True) -> None:
        with self._lock:
            for adapter in getattr(setup, "pinned", setup):  # a composed row holds all its adapters
                name = adapter.name
                if self._pins[name] > 0:
                    self._pins[name] -= 1
                if not self._pins[name]:
                    self._pins.pop(name, None)
                if served and (name in self._stored or name in self._static):
                    self._served[name] += 1
            self._evict()

    # ------------------------------------------------------------------ status
    def status(self, name: str) -> AdapterStatus:
        self.refresh(name)
        with self._lock:
            return self._status(name)

    def statuses(self) -> list[AdapterStatus]:
        self.refresh_all()
        with self._lock:
            return [self._status(n) for n in sorted([*self._static, *self._stored])]

    def _status(self, name: str) -> AdapterStatus:  # holding the lock
        if name in self._static:
            a = self._static[name]
            return AdapterStatus(name, a.format, a.method, a.num_parameters, a.nbytes, "device", True,
                                 self._served[name], 0)
        meta = self._stored.get(name)
        if meta is None:
            raise self._not_found(name)
        location = "device" if name in self._device.items else "host" if name in self._host.items else "disk"
        return AdapterStatus(name, meta.format, meta.method, meta.parameters, meta.bytes, location,
                             self._pins[name] > 0, self._served[name], meta.created)

    def resident(self) -> list[str]:
        """Names whose weights are on the device now (what a cluster's router prefers)."""
        with self._lock:
            return sorted([*self._static, *self._device.items])

    def stats(self) -> dict:
        self.refresh_all()
        with self._lock:
            return {"adapters": len(self._static) + len(self._stored), "device_adapters": len(self._device.items),
                    "device_bytes": self._device.bytes, "host_adapters": len(self._host.items),
                    "host_bytes": self._host.bytes, "pinned": sum(n > 0 for n in self._pins.values())}

    # ------------------------------------------------------------------ a store other servers write too
    def refresh(self, name: str) -> None:
        """With `shared`: align `name` with the store on disk. One stat of its meta.json while
        nothing changed; a copy deleted or replaced by another server leaves the caches here
        (like `delete`, running requests keep their reference), one added there is picked up."""
        if not self.shared or self.store is None:
            return
        signature = meta_signature(self.store.path(name))
        with self._lock:
            if name in self._static or name in self._writing or self._seen.get(name, ()) == signature:
                return
            if signature is None and name not in self._stored and name not in self._foreign:
                return  # an unknown name stays unknown (and unrecorded)
        meta, foreign = None, None
        if signature is not None:
            try:
                meta = self.store.read(name)
                foreign = self.store.foreign_reason(meta)
            except Exception as e:  # unreadable: not served here, as a start would skip it
                log.warning("stored adapter %r is unreadable: %s", name, e)
        with self._lock:
            self._seen[name] = signature
            if meta is not None and foreign is None and self._stored.get(name) == meta:
                return
            self._host.pop(name)
            self._device.pop(name)
            self._pins.pop(name, None)
            self._foreign.pop(name, None)
            if meta is None or foreign is not None or meta.name == self.base_name:
                self._stored.pop(name, None)
                self._served.pop(name, None)
                if foreign is not None:
                    self._foreign[name] = foreign  # made for another base model: 422, as at a start
                else:
                    self._seen.pop(name, None)
            else:
                self._stored[name] = meta

    def refresh_all(self) -> None:
        """With `shared`: `refresh` every name on disk or known here, when the store folder
        changed (its mtime moves with every publish and delete, which are renames in it)."""
        if not self.shared or self.store is None:
            return
        try:
            generation = os.stat(self.store.root).st_mtime_ns
        except OSError:
            return
        with self._lock:
            if generation == self._generation:
                return
            known = set(self._stored)
        on_disk = {e.name for e in self.store.root.iterdir() if not e.name.startswith(".") and e.is_dir()}
        for name in sorted(known | on_disk):
            self.refresh(name)
        with self._lock:
            self._generation = generation


def meta_signature(folder: Path) -> tuple | None:
    """What changes when a stored adapter is published anew under the same name (a new folder
    renamed into place): its meta.json's inode, mtime and size; None if there is none."""
    try:
        st = os.stat(folder / "meta.json")
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size
