"""The on-disk adapter store: every uploaded adapter, normalized, one folder per name.

    <root>/<name>/adapter_config.json       the config as uploaded (re-serialized JSON)
    <root>/<name>/adapter_model.safetensors (PEFT) or adapter.safetensors (AdapterHub)
    <root>/<name>/meta.json                 {name, format, method, created, sha256, parameters, bytes}

Each folder is still a directory its own library can load: `.bin` weights are rewritten as
safetensors after the safe read, head files and AdapterHub's per-layer prefix aliases (copies
of the canonical prefix) are dropped. An adapter is written into `<root>/.tmp-<uuid>/`, fsynced,
validated by loading it against the base model, and only then renamed to `<root>/<name>`: a
crash leaves at most a `.tmp-*` folder, which the next start deletes.
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
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .adapters import Adapter
from .errors import AdapterConflict, AdapterFormatError, AdapterNotFound, AdapterUnsupported, InvalidRequest
from .formats import detect_format, load_adapter, read_json, read_tensors
from .formats.adapterhub import HEAD_WEIGHT_FILES, eject_prefix, is_flex_model
from .models.common import ModelInfo

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# format -> (weight files a reader accepts, the file the store writes)
WEIGHTS = {
    "peft": (("adapter_model.safetensors", "adapter_model.bin"), "adapter_model.safetensors"),
    "adapterhub": (("adapter.safetensors", "pytorch_adapter.bin"), "adapter.safetensors"),
}
PREFIX_ALIAS = "prefix_tuning.pool.prefix_tunings."


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


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidRequest(f"invalid adapter name {name!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, "
                             "starting with a letter or digit")


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
    for part in (adapter.prefix, adapter.prompt):
        if part is not None and part.length > limits.max_prefix_len:
            raise AdapterUnsupported(f"prefix/prompt length {part.length} is over this server's "
                                     f"max_prefix_len={limits.max_prefix_len}")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    if format not in WEIGHTS:
        raise AdapterFormatError(f"unknown adapter format {format!r}; expected one of {', '.join(WEIGHTS)}")
    accepted, target = WEIGHTS[format]
    config = read_json(src / "adapter_config.json")
    tensors = read_tensors(src, accepted)  # safetensors, or weights_only torch.load: never a code pickle
    if format == "adapterhub":

        adapter = load_adapter(src, info, None, format)  # validates; evaluates a prefix MLP once
        config, tensors = eject_prefix(config, tensors, adapter.prefix)
    tensors = {k: v.contiguous().clone() for k, v in tensors.items() if PREFIX_ALIAS not in k}
    from safetensors.torch import save_file

    (dst / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(dst / target), metadata={"format": "pt"})
    if format == "adapterhub" and is_flex_model(config) and (src / "head_config.json").is_file():
        # a flex-model adapter's own causal-LM head: kept (HF classes' head files are dropped)
        head = read_tensors(src, HEAD_WEIGHT_FILES)
        (dst / "head_config.json").write_text(json.dumps(read_json(src / "head_config.json"), indent=2))
        save_file({k: v.contiguous() for k, v in head.items()}, str(dst / HEAD_WEIGHT_FILES[0]), metadata={"format": "pt"})
    return format


class AdapterStore:
    def __init__(self, root: str | Path, info: ModelInfo, limits: StoreLimits = StoreLimits()):
        self.root = Path(root)
        self.info = info
        self.limits = limits
        self.skipped: dict[str, str] = {}  # folder name -> why the last `scan` skipped it
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def scan(self) -> list[StoredAdapter]:
        """Every intact stored adapter; leftovers of interrupted writes are deleted, folders
        that cannot be read are logged and skipped."""
        found, self.skipped = [], {}
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith((".tmp-", ".trash-")):  # an interrupted write or delete
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
                continue
            if not entry.is_dir():
                continue
            try:
                found.append(self._read_meta(entry))
            except Exception as e:
                log.error("skipping stored adapter %s: %s", entry, e)
                self.skipped[entry.name] = str(e)
        return found

    def sweep(self) -> None:
        """Delete leftovers of interrupted writes (`.tmp-*`, `.trash-*`), e.g. at shutdown."""
        for entry in list(self.root.iterdir()):
            if entry.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)

    def _check_weights(self, folder: Path, meta: StoredAdapter) -> None:
        """The weights file is the one registered (its sha256): a corrupted adapter never runs."""
        weights = folder / WEIGHTS[meta.format][1]
        if sha256_file(weights) != meta.sha256:
            raise AdapterFormatError(f"stored adapter {meta.name!r} is corrupted: {weights.name} changed on disk "
                                     "since registration (sha256 mismatch)")

    def _read_meta(self, folder: Path) -> StoredAdapter:
        meta = StoredAdapter(**read_json(folder / "meta.json"))
        if meta.name != folder.name or meta.format not in WEIGHTS:
            raise AdapterFormatError(f"meta.json does not describe {folder.name!r}")
        read_json(folder / "adapter_config.json")
        weights = folder / WEIGHTS[meta.format][1]
        from safetensors import safe_open

        with safe_open(str(weights), "pt"):  # the header is readable; tensors load lazily later
            pass
        self._check_weights(folder, meta)
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
            meta = StoredAdapter(name, format, adapter.method, int(time.time()), sha256_file(weights),
                                 adapter.num_parameters, adapter.nbytes)
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
        return load_adapter(folder, self.info, meta.name, meta.format)

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
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(folder.iterdir()):
                if f.name != "meta.json":
                    z.write(f, f.name)
