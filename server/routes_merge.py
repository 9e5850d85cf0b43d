"""Admin routes: merge one adapter into the base weights, reset, and show the merge state.

The engine performs both between two decode steps; running requests keep their exact
outputs (see adapter_runtime/merge.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from . import auth
from .routes import get_engine

router = APIRouter()


class MergeRequest(BaseModel):
    adapter: str = Field(description="name of the adapter to fold into the base weights")


class MergeState(BaseModel):
    merged: str | None = Field(description="the adapter merged into the base weights, or null")


@router.get("/v1/merge", response_model=MergeState, dependencies=[Depends(auth.inference)])
async def merge_state(request: Request) -> MergeState:
    return MergeState(merged=get_engine(request).merged_name)


@router.post("/v1/merge", response_model=MergeState, dependencies=[Depends(auth.admin)])
async def merge(body: MergeRequest, request: Request) -> MergeState:
    engine = get_engine(request)
    return MergeState(merged=await run_in_threadpool(engine.merge, body.adapter))


@router.post("/v1/merge/reset", response_model=MergeState, dependencies=[Depends(auth.admin)])
async def reset(request: Request) -> MergeState:
    engine = get_engine(request)
    await run_in_threadpool(engine.reset)
    return MergeState(merged=None)
