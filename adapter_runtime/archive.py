"""Safe unpacking of uploaded adapter directories (loose files or one .zip / .tar.gz).

Every entry name is a relative path inside the adapter directory: no `..`, no absolute path,
no drive letter, no backslash. Links, devices and other special entries are refused, the
number of files is bounded, and every byte written is counted against `max_bytes` while it is
streamed, so a lying header or a zip bomb cannot get past the limit. Messages name entries by
their path inside the upload, never by the server's own paths. Nothing here imports torch.

`copy_from_root` is the same discipline for server-side folders (`register`): every file is
resolved, and one that leads outside the allowed root (a symbolic link) is refused.
"""

from __future__ import annotations

import os
import stat
import tarfile
import uuid
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .errors import Forbidden, InvalidRequest, PayloadTooLarge

MAX_FILES = 64
MAX_NAME_BYTES = 200  # per path component (file systems allow 255)
MAX_DEPTH = 16
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
    if any(len(p.encode()) > MAX_NAME_BYTES for p in parts) or len(parts) > MAX_DEPTH:
        raise InvalidRequest(f"path {name[:100]!r} in the upload is too long (names up to {MAX_NAME_BYTES} bytes, "
                             f"{MAX_DEPTH} folders deep)")
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
    shown = repr(name[:100])
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_dir():
            raise InvalidRequest(f"file {shown} in the upload is also a folder of other files")
        if dest.exists():
            raise InvalidRequest(f"file {shown} appears twice in the upload")
        out = open(dest, "wb")
    except (FileExistsError, NotADirectoryError):  # `README` and `README/x` in one upload
        raise InvalidRequest(f"file {shown} in the upload is below a path that is also a file") from None
    except OSError as e:  # its message would show the server's path: give only the reason
        raise InvalidRequest(f"file {shown} in the upload cannot be stored: {e.strerror}") from None
    with out:
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
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:
        raise InvalidRequest(f"archive {filename!r} is corrupt or truncated: {type(e).__name__}: {e}") from None
    except OSError as e:  # its message would name the server's paths: give only the reason
        raise InvalidRequest(f"archive {filename!r} is corrupt or truncated: {e.strerror or type(e).__name__}") from None
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
    moved = entries[0].rename(dest / f".lift-{uuid.uuid4().hex}")  # a child may share the folder's name
    for child in moved.iterdir():
        child.rename(dest / child.name)
    moved.rmdir()


def copy_from_root(directory: Path, root: Path, names: tuple[str, ...], dest: Path, budget: Budget) -> None:
    """Copy the files `names` of server-side `directory` (below `root`, both resolved) into
    `dest`. Each one is resolved first and must stay below `root` and be a regular file: a
    symbolic link to /etc/passwd is refused, not read. Absent names are skipped."""
    for name in names:
        path = directory / name
        if not os.path.lexists(path):
            continue
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):  # a dangling or looping link
            raise InvalidRequest(f"{name} in the registered folder is a broken link") from None
        if not real.is_relative_to(root):
            raise Forbidden(f"{name} in the registered folder is a link that leads outside the adapter root")
        if not real.is_file():
            raise InvalidRequest(f"{name} in the registered folder is not a regular file")
        # no link may be swapped in after the check; a FIFO must not block the open
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as src:
            if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                raise InvalidRequest(f"{name} in the registered folder is not a regular file")
            budget.add_file(name)
            copy_counted(src, dest / name, budget, name)
