"""Adapter management: upload, register from the server's disk, list, download, delete, and
vLLM's LoRA aliases. Uploads, registrations and deletes need the admin key; reads either key.

DELETE semantics: the name disappears at once (new requests get 404, it leaves the list and
the store); requests already admitted or queued with it hold a pinned reference to its
tensors and finish normally. The adapter merged into the base weights cannot be deleted (409).
"""

from __future__ import annotations

import asyncio
import io
import shutil
import uuid
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import UploadFile

from adapter_runtime import archive
from adapter_runtime.errors import AdapterConflict, Forbidden, InvalidRequest, PayloadTooLarge
from adapter_runtime.registry import AdapterStatus
from adapter_runtime.store import check_name

from . import auth
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
        raise InvalidRequest(f"format must be 'adapterhub' or 'peft', got {format!r}")
    return format


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
@router.post("/v1/adapters", status_code=201, dependencies=[Depends(auth.admin)])
async def upload_adapter(request: Request):
    engine = get_engine(request)
    store = store_of(engine)
    limit = request.app.state.settings.max_upload_bytes
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit + FORM_OVERHEAD:
        raise PayloadTooLarge(f"the upload is {length} bytes, over max_upload_bytes={limit}")
    form = await request.form(max_files=archive.MAX_FILES + 1, max_fields=8)
    staging = store.root / f".tmp-upload-{uuid.uuid4().hex}"
    try:
        name = form.get("name")
        if not isinstance(name, str):
            raise InvalidRequest("form field `name` is required")
        check_name(name)
        fmt = check_format(form.get("format") if isinstance(form.get("format"), str) else None)
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        packed = form.get("archive")
        if bool(files) == isinstance(packed, UploadFile):
            raise InvalidRequest("send either `files` (the adapter directory's files) or one `archive`, not both or neither")
        if name in engine.registry.models():
            raise AdapterConflict(f"an adapter named {name!r} already exists")  # fail fast; `add` rechecks
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
def resolve_under_root(request: Request, path: str) -> Path:
    root = request.app.state.settings.adapter_root
    if not root:
        raise Forbidden("registering server-side folders is disabled: start the server with --adapter-root DIR")
    root_path = Path(root).resolve()
    target = (root_path / path).resolve()  # an absolute `path` replaces the root here
    if target != root_path and root_path not in target.parents:
        raise Forbidden(f"path {path!r} is outside the allowed adapter root")
    if not target.is_dir():
        raise InvalidRequest(f"path {path!r} is not a directory below the adapter root")
    return target


@router.post("/v1/adapters/register", status_code=201, dependencies=[Depends(auth.admin)])
async def register_adapter(body: RegisterBody, request: Request):
    engine = get_engine(request)
    store_of(engine)
    directory = resolve_under_root(request, body.path)
    status = await asyncio.to_thread(engine.registry.add, body.name, directory, check_format(body.format))
    return JSONResponse(adapter_info(engine, status), status_code=201)


# ---------------------------------------------------------------------- delete
@router.delete("/v1/adapters/{name}", dependencies=[Depends(auth.admin)])
async def delete_adapter(name: str, request: Request) -> dict:
    engine = get_engine(request)
    if getattr(engine, "merged_name", None) == name:
        raise AdapterConflict(f"adapter {name!r} is merged into the base weights; reset before deleting it")
    await asyncio.to_thread(engine.registry.delete, name)
    return {"id": name, "object": "adapter", "deleted": True}


# ---------------------------------------------------------------------- vLLM aliases
@router.post("/v1/load_lora_adapter", dependencies=[Depends(auth.admin)])
async def load_lora_adapter(body: LoadLoraBody, request: Request):
    engine = get_engine(request)
    store_of(engine)
    directory = resolve_under_root(request, body.lora_path)
    status = await asyncio.to_thread(engine.registry.add, body.lora_name, directory, None)
    return adapter_info(engine, status)


@router.post("/v1/unload_lora_adapter", dependencies=[Depends(auth.admin)])
async def unload_lora_adapter(body: UnloadLoraBody, request: Request) -> dict:
    return await delete_adapter(body.lora_name, request)
