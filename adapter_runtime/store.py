"""The on-disk adapter store: every uploaded adapter, normalized, one folder per name.

    <root>/<name>/adapter_config.json       the config as uploaded (re-serialized JSON;
                                            adapter_fusion_config.json for an AdapterFusion)
    <root>/<name>/adapter_model.safetensors (PEFT) or adapter.safetensors (AdapterHub)
    <root>/<name>/meta.json                 {name, format, method, created, sha256, parameters, bytes,
                                             uid, base}

`uid` is the adapter's content identity (a hash over its stored files); `base` the identity of
the base model it was made for (`BaseIdentity`: architecture + a fingerprint of the config and
the weights' shapes). A server only serves the adapters made for its own base model: the
others stay on disk untouched, are not listed, and a request or an upload naming one is
refused with a message naming both models. (Adapters stored before `base` was recorded are
served by whichever base model reads them.)

Each folder is still a directory its own library can load: `.bin` weights are rewritten as
safetensors after the safe read, head files and AdapterHub's per-layer prefix aliases (copies
of the canonical prefix) are dropped. An adapter is written into `<root>/.tmp-<uuid>/`, fsynced,
validated by loading it against the base model, and only then renamed to `<root>/<name>`: a
crash leaves at most a `.tmp-*` folder, which a later start or shutdown deletes once nothing in
it has changed for `LEFTOVER_AGE_S` (the store may be shared by several servers or cluster
replicas: a fresh temp folder may be another process's upload in progress).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .adapters import Adapter, LoRA
from .errors import (AdapterConflict, AdapterFormatError, AdapterIncompatible, AdapterNotFound, AdapterUnsupported,
                     InvalidRequest, brief)
from .formats import config_file, detect_format, load_adapter, read_json, read_tensors
from .formats.adapterhub.fusion import FUSION_CONFIG, FUSION_WEIGHT_FILES, is_fusion_dir
from .export import eject_prefix, write_zip
from .formats.adapterhub.head import HEAD_WEIGHT_FILES, is_flex_model
from .formats.adapterhub.keys import PREFIX_ALIAS
from .models.common import ModelInfo

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# format -> (weight files a reader accepts, the file the store writes)
WEIGHTS = {
    "peft": (("adapter_model.safetensors", "adapter_model.bin"), "adapter_model.safetensors"),
    "adapterhub": (("adapter.safetensors", "pytorch_adapter.bin"), "adapter.safetensors"),
    "adapterhub_fusion": (FUSION_WEIGHT_FILES, FUSION_WEIGHT_FILES[0]),
}
# every file an adapter reader may open (registration copies exactly these out of --adapter-root)
ADAPTER_FILES = ("adapter_config.json", FUSION_CONFIG, "head_config.json",
                 *(f for accepted, _ in WEIGHTS.values() for f in accepted), *HEAD_WEIGHT_FILES)
LEFTOVER_PREFIXES = (".tmp-", ".trash-")  # folders of writes and deletes in progress
LEFTOVER_AGE_S = 3600.0  # a temp folder untouched this long is a crashed write's leftover
# config keys that say nothing about the model's shape or math (paths, versions, runtime flags)
VOLATILE_CONFIG_KEYS = ("transformers_version", "torch_dtype", "dtype", "use_cache")
# methods served as a LoRA whose rank is not the config's `r` (factors multiplied out by
# formats/as_lora.py; AdaLoRA's rank is init_r or what pruning kept)
FACTORED_METHODS = ("loha", "lokr", "adalora")


@dataclass(frozen=True)
class StoreLimits:
    max_lora_rank: int = 256
    max_prefix_len: int = 512


@dataclass(frozen=True)
class StoredAdapter:
    """What meta.json holds: everything listed about an adapter without loading its tensors."""

    name: str
    format: str
    method: str
    created: int
    sha256: str  # of the stored weights file
    parameters: int
    bytes: int  # fp32 size of the tensors in memory
    uid: str = ""  # content identity: a hash over the stored files ("" in old stores: computed at scan)
    base: dict | None = None  # BaseIdentity of the model it was made for (None in old stores)
    # [size, mtime_ns] of the weights file when it was hashed: a scan re-hashes it only when these
    # changed (startup stays O(adapters), not O(bytes)); loading it always checks the sha256
    weights_stat: list[int] | None = None


@dataclass(frozen=True)
class BaseIdentity:
    """Which base model a store's adapters were made for."""

    name: str  # what /v1/models calls it (for messages; not compared)
    architecture: str  # the config's model_type
    fingerprint: str  # sha256 over the config (minus paths/versions) and every weight's shape

    def describe(self) -> str:
        return f"{self.name!r} ({self.architecture}, fingerprint {self.fingerprint[:12]})"

    @staticmethod
    def of(name: str, model) -> "BaseIdentity":
        """The identity of a loaded base model (an nn.Module with an HF `config`)."""
        config = {k: v for k, v in model.config.to_dict().items()
                  if not k.startswith("_") and k not in VOLATILE_CONFIG_KEYS}
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        blob = json.dumps({"config": config, "shapes": shapes}, sort_keys=True, default=str)
        return BaseIdentity(name, str(config.get("model_type", "?")), hashlib.sha256(blob.encode()).hexdigest())


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidRequest(f"invalid adapter name {brief(name)}: use 1-128 characters from A-Z a-z 0-9 . _ -, "
                             "starting with a letter or digit")


def content_uid(folder: Path, hashes: dict[str, str] | None = None) -> str:
    """A hash over every file of a stored adapter but meta.json (config, weights, head): two
    folders with the same uid give the same outputs. `hashes`: file name -> sha256, if known."""
    hashes = dict(hashes or {})
    for f in sorted(folder.iterdir()):
        if f.name != "meta.json" and f.name not in hashes:
            hashes[f.name] = sha256_file(f)
    return hashlib.sha256(json.dumps(sorted(hashes.items())).encode()).hexdigest()


def lora_rank(config) -> int:
    """The largest LoRA rank a config declares (`r`, PEFT's `rank_pattern`), nested configs included."""
    if isinstance(config, dict):
        ranks = [v for k, v in config.items() if k == "r" and isinstance(v, int) and not isinstance(v, bool)]
        pattern = config.get("rank_pattern")
        if isinstance(pattern, dict):
            ranks += [v for v in pattern.values() if isinstance(v, int)]
        return max([0, *ranks, *(lora_rank(v) for v in config.values())])
    if isinstance(config, list):
        return max([0, *(lora_rank(v) for v in config)])
    return 0


def check_limits(adapter: Adapter, limits: StoreLimits) -> None:
    rank = lora_rank(dict(adapter.config))
    if rank > limits.max_lora_rank:
        raise AdapterUnsupported(f"LoRA rank {rank} is over this server's max_lora_rank={limits.max_lora_rank}")
    if adapter.method in FACTORED_METHODS:  # served as an exact LoRA whose rank is not the config's r
        served = max((e.A.shape[0] for e in adapter.linear.values() if isinstance(e, LoRA)), default=0)
        if served > limits.max_lora_rank:
            raise AdapterUnsupported(
                f"{adapter.method} adapter is served as an exact LoRA of rank {served} (its factors multiplied out), "
                f"over this server's max_lora_rank={limits.max_lora_rank}")
    for part in (adapter.prefix, adapter.prompt):
        if part is not None and part.length > limits.max_prefix_len:
            raise AdapterUnsupported(f"prefix/prompt length {part.length} is over this server's "
                                     f"max_prefix_len={limits.max_prefix_len}")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def remove_if_stale(entry: Path, max_age_s: float = LEFTOVER_AGE_S) -> bool:
    """Delete a temp file or folder when nothing in it changed for `max_age_s` seconds (the
    newest mtime of the folder and everything below it)."""
    try:
        newest = entry.lstat().st_mtime
        if entry.is_dir() and not entry.is_symlink():
            for below in entry.rglob("*"):
                newest = max(newest, below.lstat().st_mtime)
    except FileNotFoundError:  # its owner finished (renamed or removed it) meanwhile
        return False
    if time.time() - newest < max_age_s:
        return False
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stat_of(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def normalize(src: Path, dst: Path, format: str | None, info: ModelInfo) -> str:
    """Write `src`'s adapter into the empty folder `dst` in normalized form; return its format.
    AdapterHub prefix tuning is stored ejected: flat K/V and `flat: true`."""
    format = format or detect_format(src)
    if format == "adapterhub" and is_fusion_dir(src):
        format = "adapterhub_fusion"
    if format not in WEIGHTS:
        raise AdapterFormatError(f"unknown adapter format {format!r}; expected one of {', '.join(WEIGHTS)}")
    accepted, target = WEIGHTS[format]
    config = read_json(src / config_file(format))
    tensors = read_tensors(src, accepted)  # safetensors, or weights_only torch.load: never a code pickle
    if format == "adapterhub":

        adapter = load_adapter(src, info, None, format)  # validates; evaluates a prefix MLP once
        config, tensors = eject_prefix(config, tensors, adapter.prefix)
    tensors = {k: v.contiguous().clone() for k, v in tensors.items() if PREFIX_ALIAS not in k}
    from safetensors.torch import save_file

    if format == "adapterhub_fusion":
        load_adapter(src, info, None, format)  # validates (a fusion has no store form of its own)
    (dst / config_file(format)).write_text(json.dumps(config, indent=2))
    save_file(tensors, str(dst / target), metadata={"format": "pt"})
    if format == "adapterhub" and is_flex_model(config) and (src / "head_config.json").is_file():
        # a flex-model adapter's own causal-LM head: kept (HF classes' head files are dropped)
        head = read_tensors(src, HEAD_WEIGHT_FILES)
        (dst / "head_config.json").write_text(json.dumps(read_json(src / "head_config.json"), indent=2))
        save_file({k: v.contiguous() for k, v in head.items()}, str(dst / HEAD_WEIGHT_FILES[0]), metadata={"format": "pt"})
    return format


class AdapterStore:
    def __init__(self, root: str | Path, info: ModelInfo, limits: StoreLimits = StoreLimits(),
                 base: BaseIdentity | None = None):
        """`base`: the model this server runs; adapters recorded for another one are not served.
        None leaves the store unbound (every adapter is served and none records a base)."""
        self.root = Path(root)
        self.info = info
        self.limits = limits
        self.base = base
        self.skipped: dict[str, str] = {}  # folder name -> why the last `scan` skipped it
        self.foreign: dict[str, str] = {}  # name -> why it is not served (made for another base model)
        self.root.mkdir(parents=True, exist_ok=True)

    def foreign_reason(self, meta: StoredAdapter) -> str | None:
        """None if `meta` was made for this store's base model (or either side is unrecorded)."""
        if self.base is None or not isinstance(meta.base, dict) or meta.base.get("fingerprint") == self.base.fingerprint:
            return None
        theirs = BaseIdentity(str(meta.base.get("name")), str(meta.base.get("architecture")),
                              str(meta.base.get("fingerprint")))
        return (f"adapter {meta.name!r} was made for base model {theirs.describe()}, but this server runs "
                f"{self.base.describe()}; it is kept in the store for that model and not served here")

    def path(self, name: str) -> Path:
        return self.root / name

    def scan(self) -> list[StoredAdapter]:
        """Every intact stored adapter; leftovers of interrupted writes are deleted, folders
        that cannot be read are logged and skipped."""
        found, self.skipped, self.foreign = [], {}, {}
        legacy = 0
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(LEFTOVER_PREFIXES):  # a write or delete: interrupted, or another process's
                remove_if_stale(entry)
                continue
            if not entry.is_dir():
                continue
            try:
                meta = self._read_meta(entry)
            except Exception as e:
                log.error("skipping stored adapter %s: %s", entry, e)
                self.skipped[entry.name] = str(e)
                continue
            if (reason := self.foreign_reason(meta)) is not None:
                self.foreign[meta.name] = reason
                continue
            legacy += meta.base is None and self.base is not None
            found.append(meta)
        if self.foreign:
            log.warning("%d stored adapters were made for another base model and are not served: %s",
                        len(self.foreign), ", ".join(sorted(self.foreign)[:10]))
        if legacy:
            log.warning("%d stored adapters record no base model (stored by an older version); they are served by "
                        "this base model %s", legacy, self.base.describe())
        return found

    def sweep(self) -> None:
        """Delete leftovers of interrupted writes (`.tmp-*`, `.trash-*`), e.g. at shutdown; a
        temp folder changed within `LEFTOVER_AGE_S` may be another process's write and stays."""
        for entry in list(self.root.iterdir()):
            if entry.name.startswith(LEFTOVER_PREFIXES):
                remove_if_stale(entry)

    def _check_weights(self, folder: Path, meta: StoredAdapter, unless_unchanged: bool = False) -> None:
        """The weights file is the one registered (its sha256): a corrupted adapter never runs.
        `unless_unchanged`: trust a file whose size and mtime are those recorded when it was
        hashed (a scan; `load` always hashes)."""
        weights = folder / WEIGHTS[meta.format][1]
        if unless_unchanged and meta.weights_stat is not None and list(meta.weights_stat) == stat_of(weights):
            return
        if sha256_file(weights) != meta.sha256:
            raise AdapterFormatError(f"stored adapter {meta.name!r} is corrupted: {weights.name} changed on disk "
                                     "since registration (sha256 mismatch)")

    def _read_meta(self, folder: Path) -> StoredAdapter:
        try:
            meta = StoredAdapter(**read_json(folder / "meta.json"))
        except TypeError as e:
            raise AdapterFormatError(f"meta.json of {folder.name!r} has unexpected fields: {e}") from None
        if meta.name != folder.name or meta.format not in WEIGHTS:
            raise AdapterFormatError(f"meta.json does not describe {folder.name!r}")
        read_json(folder / config_file(meta.format))
        weights = folder / WEIGHTS[meta.format][1]
        from safetensors import safe_open

        with safe_open(str(weights), "pt"):  # the header is readable; tensors load lazily later
            pass
        self._check_weights(folder, meta, unless_unchanged=True)
        if not meta.uid:  # stored by an older version
            meta = replace(meta, uid=content_uid(folder, {weights.name: meta.sha256}))
        return meta

    def read(self, name: str) -> StoredAdapter:
        """The metadata of one stored adapter, checked like `scan` checks it."""
        return self._read_meta(self.path(name))

    def add(self, name: str, src: Path, format: str | None = None) -> tuple[StoredAdapter, Adapter]:
        """Normalize, validate against the base model, and publish `src` as `name`, atomically.
        The caller guarantees no other writer uses `name` at the same time."""
        check_name(name)
        if self.path(name).exists():
            raise AdapterConflict(f"an adapter named {name!r} already exists")
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            format = normalize(Path(src), tmp, format, self.info)
            adapter = load_adapter(tmp, self.info, name, format)
            check_limits(adapter, self.limits)
            weights = tmp / WEIGHTS[format][1]
            sha = sha256_file(weights)
            uid = content_uid(tmp, {weights.name: sha})
            adapter = replace(adapter, uid=uid)
            meta = StoredAdapter(name, format, adapter.method, int(time.time()), sha, adapter.num_parameters,
                                 adapter.nbytes, uid, asdict(self.base) if self.base is not None else None,
                                 stat_of(weights))
            (tmp / "meta.json").write_text(json.dumps(asdict(meta), indent=2))
            for f in tmp.iterdir():
                _fsync_file(f)
            _fsync_dir(tmp)
            os.rename(tmp, self.path(name))
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return meta, adapter

    def load(self, meta: StoredAdapter) -> Adapter:
        folder = self.path(meta.name)
        if not folder.is_dir():
            raise AdapterNotFound(f"adapter {meta.name!r} is not in the store")
        self._check_weights(folder, meta)
        return replace(load_adapter(folder, self.info, meta.name, meta.format), uid=meta.uid)

    def delete(self, name: str) -> None:
        """Rename away first (atomic: the name is gone at once), then remove the files."""
        folder = self.path(name)
        if not folder.exists():
            return
        trash = self.root / f".trash-{uuid.uuid4().hex}"
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def write_zip(self, name: str, out) -> None:
        """The stored folder (config + weights, no meta.json) as a zip, into file object `out`."""
        folder = self.path(name)
        if not folder.is_dir():
            raise AdapterNotFound(f"adapter {name!r} is not in the store")
        write_zip(folder, out)
