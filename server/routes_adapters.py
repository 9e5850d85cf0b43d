"""Adapter management: upload, register from the server's disk, list, download, delete, and
vLLM's LoRA aliases. Uploads, registrations and deletes need the admin key; reads either key.

DELETE semantics: the name disappears at once (new requests get 404, it leaves the list and
the store); requests already admitted or queued with it hold a pinned reference to its
tensors and finish normally. The adapter merged into the base weights cannot be deleted (409).

Uploads are refused as early as possible: a declared size over the limit (Content-Length), and
with the name given as a query parameter (`POST /v1/adapters?name=x`) an invalid or taken name,
before a byte of the body is read; past the limit the body is refused while it streams in
(chunked bodies too). `POST /v1/adapters/check` asks the same questions without any body.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import uuid
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from adapter_runtime import archive
from adapter_runtime.engine import Engine
from adapter_runtime.errors import AdapterRuntimeError, Forbidden, InvalidRequest, PayloadTooLarge, brief
from adapter_runtime.registry import AdapterStatus
from adapter_runtime.store import ADAPTER_FILES

from . import auth, errors
from .deps import get_engine, get_settings
from .settings import Settings

router = APIRouter()
FORM_OVERHEAD = 1 << 20  # multipart headers and boundaries on top of the file bytes


class RegisterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    path: str
    format: str | None = None


class LoadLoraBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_path: str


class UnloadLoraBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str


class UploadCheckBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    bytes: int | None = Field(None, ge=0, description="size of the upload body that would be sent")


class AdapterInfo(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    format: str = Field(description="adapterhub | peft")
    method: str = Field(description="lora, ia3, bottleneck, prefix, prompt, ... (the adapter's method)")
    parameters: int
    bytes: int
    location: str = Field(description="where its weights are now: disk | host | device")
    pinned: bool = Field(description="registered at startup (never evicted)")
    merged: bool = Field(description="folded into the base weights (POST /v1/merge)")
    requests_served: int
    created: int


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True


class UploadCheck(BaseModel):
    name: str
    ok: bool = True
    max_upload_bytes: int


def adapter_info(engine: Engine, status: AdapterStatus) -> AdapterInfo:
    return AdapterInfo(id=status.name, format=status.format, method=status.method, parameters=status.parameters,
                       bytes=status.bytes, location=status.location, pinned=status.pinned,
                       merged=engine.merged_name == status.name, requests_served=status.requests_served,
                       created=status.created)


def created(info: AdapterInfo) -> JSONResponse:
    """201 with the new adapter."""
    return JSONResponse(info.model_dump(), status_code=201)


def store_of(engine):
    if engine.registry.store is None:
        raise InvalidRequest("this server has no adapter store")
    return engine.registry.store


def check_format(format: str | None) -> str | None:
    if format in (None, ""):
        return None
    if format not in ("adapterhub", "peft"):
        raise InvalidRequest(f"format must be 'adapterhub' or 'peft', got {brief(format)}")
    return format


def check_size(size: int | None, limit: int) -> None:
    if size is not None and size > limit + FORM_OVERHEAD:
        raise PayloadTooLarge(f"the upload is {size} bytes, over max_upload_bytes={limit}")


def counted_receive(receive, cap: int, limit: int):
    """`receive` that refuses (413) once more than `cap` body bytes came in: a chunked body
    without Content-Length is stopped while it streams, never read whole first."""
    seen = 0

    async def counted():
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > cap:
            raise PayloadTooLarge(f"the upload is over {seen} bytes, over max_upload_bytes={limit}")
        return message

    return counted


# ---------------------------------------------------------------------- reads
@router.get("/v1/adapters", response_model=AdapterList, dependencies=[Depends(auth.inference)])
async def list_adapters(engine: Engine = Depends(get_engine)) -> AdapterList:
    return AdapterList(data=[adapter_info(engine, s) for s in engine.registry.statuses()])


@router.get("/v1/adapters/{name}", response_model=AdapterInfo, dependencies=[Depends(auth.inference)])
async def get_adapter(name: str, engine: Engine = Depends(get_engine)) -> AdapterInfo:
    return adapter_info(engine, engine.registry.status(name))


@router.get("/v1/adapters/{name}/files", response_class=Response, dependencies=[Depends(auth.inference)],
            responses={200: {"content": {"application/zip": {}}, "description": "the adapter's files, zipped"}})
async def adapter_files(name: str, engine: Engine = Depends(get_engine)) -> Response:
    engine.registry.status(name)  # 404 for unknown names
    buffer = io.BytesIO()
    await asyncio.to_thread(store_of(engine).write_zip, name, buffer)
    return Response(buffer.getvalue(), media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{name}.zip"'})


# ---------------------------------------------------------------------- uploads
@router.post("/v1/adapters/check", response_model=UploadCheck, dependencies=[Depends(auth.admin)])
async def check_upload(body: UploadCheckBody, engine: Engine = Depends(get_engine),
                       settings: Settings = Depends(get_settings)) -> UploadCheck:
    """Would an upload named `name` of `bytes` bytes be accepted? The same 4xx as the upload
    would give (invalid or taken name, too large), without sending the body."""
    store_of(engine)
    engine.registry.check_free(body.name)
    check_size(body.bytes, settings.max_upload_bytes)
    return UploadCheck(name=body.name, max_upload_bytes=settings.max_upload_bytes)


@router.post("/v1/adapters", status_code=201, response_model=AdapterInfo, dependencies=[Depends(auth.admin)])
async def upload_adapter(request: Request,
                         name: str | None = Query(None, description="the adapter's name; given here (rather than as "
                                                  "a form field) a bad or taken name is refused before the body is read"),
                         format: str | None = Query(None, description="'adapterhub' or 'peft' (default: detected)"),
                         engine: Engine = Depends(get_engine), settings: Settings = Depends(get_settings)):
    store = store_of(engine)
    limit = settings.max_upload_bytes
    try:
        length = request.headers.get("content-length")
        check_size(int(length) if length and length.isdigit() else None, limit)
        if name is not None:
            engine.registry.check_free(name)  # before the body: 400 / 409 at once
        fmt = check_format(format)
        reader = Request(request.scope, counted_receive(request.receive, limit + FORM_OVERHEAD, limit))
        form = await reader.form(max_files=archive.MAX_FILES + 1, max_fields=8)
    except AdapterRuntimeError as e:  # refused before the body was read whole: close the connection,
        status, body = errors.describe(e)  # or the server would go on receiving (and dropping) the rest
        return JSONResponse(body, status_code=status, headers={"Connection": "close"})
    staging = store.root / f".tmp-upload-{uuid.uuid4().hex}"
    try:
        field = form.get("name")
        if name is not None and field is not None and field != name:
            raise InvalidRequest("the `name` query parameter and the `name` form field differ")
        name = name if name is not None else field
        if not isinstance(name, str):
            raise InvalidRequest("the adapter's `name` is required (query parameter or form field)")
        engine.registry.check_free(name)  # fail fast; `add` rechecks under its lock
        field = form.get("format")
        fmt = fmt or check_format(field if isinstance(field, str) else None)
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        packed = form.get("archive")
        if bool(files) == isinstance(packed, UploadFile):
            raise InvalidRequest("send either `files` (the adapter directory's files) or one `archive`, not both or neither")
        await asyncio.to_thread(stage, staging, files, packed if isinstance(packed, UploadFile) else None, limit)
        status = await asyncio.to_thread(engine.registry.add, name, staging, fmt)
    finally:
        await form.close()
        shutil.rmtree(staging, ignore_errors=True)
    return created(adapter_info(engine, status))


def stage(staging: Path, files: list[UploadFile], packed: UploadFile | None, limit: int) -> None:
    """Write the uploaded files (or the unpacked archive) into `staging`, checking every path
    and counting every byte."""
    staging.mkdir(parents=True)
    budget = archive.Budget(limit)
    if packed is not None:
        kind = archive.archive_kind(packed.filename or "")
        raw = staging.with_name(staging.name + "." + kind.replace(".", ""))
        try:
            packed.file.seek(0)
            archive.copy_counted(packed.file, raw, archive.Budget(limit), packed.filename or "archive")
            archive.unpack(raw, packed.filename or "", staging, budget)
        finally:
            raw.unlink(missing_ok=True)
        return
    for f in files:
        rel = archive.safe_relpath(f.filename or "")
        budget.add_file(str(rel))
        f.file.seek(0)
        archive.copy_counted(f.file, staging / rel, budget, str(rel))


# ---------------------------------------------------------------------- server-side folders
def resolve_under_root(root: str | None, path: str) -> tuple[Path, Path]:
    """(the folder, the resolved root) for a `path` relative to --adapter-root (`root`)."""
    if not root:
        raise Forbidden("registering server-side folders is disabled: start the server with --adapter-root DIR")
    if "\x00" in path:
        raise InvalidRequest("path must not contain a NUL character")
    root_path = Path(root).resolve()
    target = (root_path / path).resolve()  # an absolute `path` replaces the root here
    if target != root_path and root_path not in target.parents:
        raise Forbidden(f"path {brief(path)} is outside the allowed adapter root")
    if not target.is_dir():
        raise InvalidRequest(f"path {brief(path)} is not a directory below the adapter root")
    return target, root_path


async def add_from_root(engine: Engine, settings: Settings, name: str, path: str, format: str | None) -> AdapterStatus:
    """Copy the folder's adapter files (each resolved: none may lead out of the root) into a
    staging folder and add that, so the store never reads through a link."""
    store = store_of(engine)
    engine.registry.check_free(name)
    directory, root = resolve_under_root(settings.adapter_root, path)
    staging = store.root / f".tmp-register-{uuid.uuid4().hex}"
    budget = archive.Budget(settings.max_upload_bytes)
    try:
        staging.mkdir(parents=True)
        await asyncio.to_thread(archive.copy_from_root, directory, root, ADAPTER_FILES, staging, budget)
        return await asyncio.to_thread(engine.registry.add, name, staging, format)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@router.post("/v1/adapters/register", status_code=201, response_model=AdapterInfo, dependencies=[Depends(auth.admin)])
async def register_adapter(body: RegisterBody, engine: Engine = Depends(get_engine),
                           settings: Settings = Depends(get_settings)):
    status = await add_from_root(engine, settings, body.name, body.path, check_format(body.format))
    return created(adapter_info(engine, status))


# ---------------------------------------------------------------------- delete
@router.delete("/v1/adapters/{name}", response_model=AdapterDeleted, dependencies=[Depends(auth.admin)])
async def delete_adapter(name: str, engine: Engine = Depends(get_engine)) -> AdapterDeleted:
    await asyncio.to_thread(engine.registry.delete, name)  # 409 for the merged adapter, atomically
    return AdapterDeleted(id=name)


# ---------------------------------------------------------------------- vLLM aliases
@router.post("/v1/load_lora_adapter", response_model=AdapterInfo, dependencies=[Depends(auth.admin)])
async def load_lora_adapter(body: LoadLoraBody, engine: Engine = Depends(get_engine),
                            settings: Settings = Depends(get_settings)) -> AdapterInfo:
    return adapter_info(engine, await add_from_root(engine, settings, body.lora_name, body.lora_path, None))


@router.post("/v1/unload_lora_adapter", response_model=AdapterDeleted, dependencies=[Depends(auth.admin)])
async def unload_lora_adapter(body: UnloadLoraBody, engine: Engine = Depends(get_engine)) -> AdapterDeleted:
    return await delete_adapter(body.lora_name, engine)
