"""Safe unpacking of uploaded adapter directories (loose files or one .zip / .tar.gz).

Every entry name is a relative path inside the adapter directory: no `..`, no absolute path,
no drive letter, no backslash. Links, devices and other special entries are refused, the
number of files is bounded, and every byte written is counted against `max_bytes` while it is
streamed, so a lying header or a zip bomb cannot get past the limit. Nothing here imports torch.
"""

from __future__ import annotations

import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .errors import InvalidRequest, PayloadTooLarge

MAX_FILES = 64
CHUNK = 1 << 20


def safe_relpath(name: str) -> PurePosixPath:
    """`name` as a relative path with no way out of the directory, or InvalidRequest."""
    if not name or "\\" in name or "\x00" in name:
        raise InvalidRequest(f"unsafe path {name!r} in the upload: only plain relative paths are accepted")
    path = PurePosixPath(name)
    if path.is_absolute() or (path.parts and path.parts[0].endswith(":")):
        raise InvalidRequest(f"absolute path {name!r} in the upload: only relative paths are accepted")
    if ".." in path.parts:
        raise InvalidRequest(f"path {name!r} in the upload contains '..'")
    parts = [p for p in path.parts if p != "."]
    if not parts:
        raise InvalidRequest(f"empty path {name!r} in the upload")
    return PurePosixPath(*parts)


class Budget:
    """A running count of uploaded bytes and files against the limits."""

    def __init__(self, max_bytes: int, max_files: int = MAX_FILES):
        self.max_bytes, self.max_files = max_bytes, max_files
        self.bytes = self.files = 0

    def add_file(self, name: str) -> None:
        self.files += 1
        if self.files > self.max_files:
            raise InvalidRequest(f"the upload has more than {self.max_files} files")

    def add_bytes(self, n: int, name: str) -> None:
        self.bytes += n
        if self.bytes > self.max_bytes:
            raise PayloadTooLarge(f"the upload is larger than max_upload_bytes={self.max_bytes} (at file {name!r})")


def copy_counted(src: BinaryIO, dest: Path, budget: Budget, name: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        raise InvalidRequest(f"file {name!r} appears twice in the upload")
    with open(dest, "wb") as out:
        while chunk := src.read(CHUNK):
            budget.add_bytes(len(chunk), name)
            out.write(chunk)


def archive_kind(filename: str) -> str:
    lower = filename.lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    raise InvalidRequest(f"archive {filename!r} must be a .zip, .tar.gz or .tgz file")


def unpack(archive: Path, filename: str, dest: Path, budget: Budget) -> None:
    """Extract `archive` into `dest` (which must be empty), then lift a single top folder."""
    kind = archive_kind(filename)
    try:
        if kind == "zip":
            _unzip(archive, dest, budget)
        else:
            _untar(archive, dest, budget)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise InvalidRequest(f"archive {filename!r} is corrupt or truncated: {type(e).__name__}: {e}") from None
    lift_single_folder(dest)


def _unzip(archive: Path, dest: Path, budget: Budget) -> None:
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise InvalidRequest(f"archive entry {info.filename!r} is a symbolic link; links are not accepted")
            rel = safe_relpath(info.filename.rstrip("/") if info.is_dir() else info.filename)
            if info.is_dir():
                continue
            budget.add_file(info.filename)
            if info.file_size > budget.max_bytes:
                raise PayloadTooLarge(f"archive entry {info.filename!r} is {info.file_size} bytes, over "
                                      f"max_upload_bytes={budget.max_bytes}")
            with z.open(info) as src:  # CRC and length are checked as it streams
                copy_counted(src, dest / rel, budget, info.filename)


def _untar(archive: Path, dest: Path, budget: Budget) -> None:
    with tarfile.open(archive, "r:gz") as t:
        for member in t:
            rel = safe_relpath(member.name)
            if member.isdir():
                continue
            if not member.isfile():
                raise InvalidRequest(f"archive entry {member.name!r} is a link or special file; only regular files are accepted")
            budget.add_file(member.name)
            if member.size > budget.max_bytes:
                raise PayloadTooLarge(f"archive entry {member.name!r} is {member.size} bytes, over "
                                      f"max_upload_bytes={budget.max_bytes}")
            src = t.extractfile(member)
            copy_counted(src, dest / rel, budget, member.name)
            if (dest / rel).stat().st_size != member.size:
                raise InvalidRequest(f"archive entry {member.name!r} is truncated")


def lift_single_folder(dest: Path) -> None:
    """Files inside one top folder (`my-adapter/adapter_config.json`) move up to `dest`."""
    entries = list(dest.iterdir())
    if len(entries) != 1 or not entries[0].is_dir():
        return
    moved = entries[0].rename(dest / ".lifted")  # a child may share the folder's name
    for child in moved.iterdir():
        child.rename(dest / child.name)
    moved.rmdir()
