"""Admin routes: merge one adapter into the base weights, reset, and show the merge state.

The engine performs both between two decode steps; running requests keep their exact
outputs (see adapter_runtime/merge.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from adapter_runtime.engine import Engine

from . import auth
from .deps import get_engine

router = APIRouter()


class MergeRequest(BaseModel):
    adapter: str = Field(description="name of the adapter to fold into the base weights")


class MergeState(BaseModel):
    merged: str | None = Field(description="the adapter merged into the base weights, or null")


@router.get("/v1/merge", response_model=MergeState, dependencies=[Depends(auth.inference)])
async def merge_state(engine: Engine = Depends(get_engine)) -> MergeState:
    return MergeState(merged=engine.merged_name)


@router.post("/v1/merge", response_model=MergeState, dependencies=[Depends(auth.admin)])
async def merge(body: MergeRequest, engine: Engine = Depends(get_engine)) -> MergeState:
    return MergeState(merged=await run_in_threadpool(engine.merge, body.adapter))


@router.post("/v1/merge/reset", response_model=MergeState, dependencies=[Depends(auth.admin)])
async def reset(engine: Engine = Depends(get_engine)) -> MergeState:
    await run_in_threadpool(engine.reset)
    return MergeState(merged=None)
