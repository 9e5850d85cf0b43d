"""Admin route that composes stored adapters into a new one: AdapterHub's `average_adapter`
(adapter_runtime/average.py), stored and served like an upload."""

from __future__ import annotations

import asyncio
import shutil
import uuid

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from adapter_runtime import average
from adapter_runtime.engine import Engine
from adapter_runtime.errors import AdapterConflict, InvalidRequest
from adapter_runtime.store import check_name

from . import auth
from .deps import get_engine
from .routes_adapters import AdapterInfo, adapter_info, created, store_of

router = APIRouter()


class AverageBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="name of the new adapter")
    adapters: list[str] = Field(min_length=1, max_length=64, description="stored AdapterHub adapters to average")
    weights: list[float] | None = Field(None, description="one per adapter; default equal weights")
    combine_strategy: str = Field("linear", description="linear | lora_linear_only_negate_b | lora_delta_w_svd")
    normalize_weights: bool = Field(True, description="divide the weights by their sum (as the library does)")
    svd_rank: int | None = Field(None, description="rank of the new LoRA, for lora_delta_w_svd")


@router.post("/v1/adapters/average", status_code=201, response_model=AdapterInfo, dependencies=[Depends(auth.admin)])
async def average_adapters(body: AverageBody, engine: Engine = Depends(get_engine)):
    """A new stored adapter whose weights are the weighted average of `adapters`, as the
    `adapters` library's `average_adapter(name, adapters, weights, combine_strategy,
    normalize_weights, svd_rank)` computes it -> 201 with the new adapter."""
    store = store_of(engine)
    check_name(body.name)
    if body.name in engine.registry.models():
        raise AdapterConflict(f"an adapter named {body.name!r} already exists")
    status = await asyncio.to_thread(create_average, engine, store, body)
    return created(adapter_info(engine, status))


def create_average(engine, store, body: AverageBody):
    if len(set(body.adapters)) != len(body.adapters):
        raise InvalidRequest("adapters lists a name twice")
    known = set(engine.registry.names())
    sources = []
    for name in body.adapters:
        if name not in known:
            raise InvalidRequest(f"unknown adapter {name!r} in adapters")
        if engine.registry.status(name).format != "adapterhub":
            raise InvalidRequest(f"adapter {name!r} is not an AdapterHub adapter: average_adapter is the `adapters` "
                                 "library's operation")
        folder = store.path(name)
        if not folder.is_dir():
            raise InvalidRequest(f"adapter {name!r} was registered at startup and has no stored files to average")
        sources.append(average.read_source(folder, name))
    meta, tensors = average.average(sources, body.name, body.weights, body.combine_strategy, body.normalize_weights,
                                    body.svd_rank)
    staging = store.root / f".tmp-average-{uuid.uuid4().hex}"
    try:
        average.write_adapter(staging, meta, tensors)
        return engine.registry.add(body.name, staging, "adapterhub")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
