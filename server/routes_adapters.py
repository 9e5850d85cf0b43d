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

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from adapter_runtime import archive
from adapter_runtime.errors import AdapterRuntimeError, Forbidden, InvalidRequest, PayloadTooLarge, brief
from adapter_runtime.registry import AdapterStatus
from adapter_runtime.store import ADAPTER_FILES

from . import auth, errors
from .routes import get_engine

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


def adapter_info(engine, status: AdapterStatus) -> dict:
    return {"id": status.name, "object": "adapter", "format": status.format, "method": status.method,
            "parameters": status.parameters, "bytes": status.bytes, "location": status.location,
            "pinned": status.pinned, "merged": getattr(engine, "merged_name", None) == status.name,
            "requests_served": status.requests_served, "created": status.created}


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
@router.get("/v1/adapters", dependencies=[Depends(auth.inference)])
async def list_adapters(request: Request) -> dict:
    engine = get_engine(request)
    return {"object": "list", "data": [adapter_info(engine, s) for s in engine.registry.statuses()]}


@router.get("/v1/adapters/{name}", dependencies=[Depends(auth.inference)])
async def get_adapter(name: str, request: Request) -> dict:
    engine = get_engine(request)
    return adapter_info(engine, engine.registry.status(name))


@router.get("/v1/adapters/{name}/files", dependencies=[Depends(auth.inference)])
async def adapter_files(name: str, request: Request) -> Response:
    engine = get_engine(request)
    engine.registry.status(name)  # 404 for unknown names
    buffer = io.BytesIO()
    await asyncio.to_thread(store_of(engine).write_zip, name, buffer)
    return Response(buffer.getvalue(), media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{name}.zip"'})


# ---------------------------------------------------------------------- uploads
@router.post("/v1/adapters/check", dependencies=[Depends(auth.admin)])
async def check_upload(body: UploadCheckBody, request: Request) -> dict:
    """Would an upload named `name` of `bytes` bytes be accepted? The same 4xx as the upload
    would give (invalid or taken name, too large), without sending the body."""
    engine = get_engine(request)
    store_of(engine)
    limit = request.app.state.settings.max_upload_bytes
    engine.registry.check_free(body.name)
    check_size(body.bytes, limit)
    return {"name": body.name, "ok": True, "max_upload_bytes": limit}


@router.post("/v1/adapters", status_code=201, dependencies=[Depends(auth.admin)])
async def upload_adapter(request: Request,
                         name: str | None = Query(None, description="the adapter's name; given here (rather than as "
                                                  "a form field) a bad or taken name is refused before the body is read"),
                         format: str | None = Query(None, description="'adapterhub' or 'peft' (default: detected)")):
    engine = get_engine(request)
    store = store_of(engine)
    limit = request.app.state.settings.max_upload_bytes
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
    return JSONResponse(adapter_info(engine, status), status_code=201)


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
def resolve_under_root(request: Request, path: str) -> tuple[Path, Path]:
    """(the folder, the resolved root) for a `path` relative to --adapter-root."""
    root = request.app.state.settings.adapter_root
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


async def add_from_root(request: Request, name: str, path: str, format: str | None) -> AdapterStatus:
    """Copy the folder's adapter files (each resolved: none may lead out of the root) into a
    staging folder and add that, so the store never reads through a link."""
    engine = get_engine(request)
    store = store_of(engine)
    engine.registry.check_free(name)
    directory, root = resolve_under_root(request, path)
    staging = store.root / f".tmp-register-{uuid.uuid4().hex}"
    budget = archive.Budget(request.app.state.settings.max_upload_bytes)
    try:
        staging.mkdir(parents=True)
        await asyncio.to_thread(archive.copy_from_root, directory, root, ADAPTER_FILES, staging, budget)
        return await asyncio.to_thread(engine.registry.add, name, staging, format)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@router.post("/v1/adapters/register", status_code=201, dependencies=[Depends(auth.admin)])
async def register_adapter(body: RegisterBody, request: Request):
    status = await add_from_root(request, body.name, body.path, check_format(body.format))
    return JSONResponse(adapter_info(get_engine(request), status), status_code=201)


# ---------------------------------------------------------------------- delete
@router.delete("/v1/adapters/{name}", dependencies=[Depends(auth.admin)])
async def delete_adapter(name: str, request: Request) -> dict:
    engine = get_engine(request)
    await asyncio.to_thread(engine.registry.delete, name)  # 409 for the merged adapter, atomically
    return {"id": name, "object": "adapter", "deleted": True}


# ---------------------------------------------------------------------- vLLM aliases
@router.post("/v1/load_lora_adapter", dependencies=[Depends(auth.admin)])
async def load_lora_adapter(body: LoadLoraBody, request: Request):
    status = await add_from_root(request, body.lora_name, body.lora_path, None)
    return adapter_info(get_engine(request), status)


@router.post("/v1/unload_lora_adapter", dependencies=[Depends(auth.admin)])
async def unload_lora_adapter(body: UnloadLoraBody, request: Request) -> dict:
    return await delete_adapter(body.lora_name, request)
