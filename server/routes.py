"""HTTP routes: OpenAI-style completions and model list, plus a health check."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from typing import AsyncIterator, Sequence

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from adapter_runtime.engine import Completion, Engine, Event, RequestHandle, TokenLogprob
from adapter_runtime.engine import Request as EngineRequest
from adapter_runtime.errors import EngineUnavailable, InvalidRequest
from adapter_runtime.sampling import SamplingParams

from . import auth, errors, limits
from .schemas import (CompletionChoice, CompletionRequest, CompletionResponse, Logprobs, ModelCard, ModelList,
                      Prompt, Usage)

router = APIRouter()

DISCONNECT_POLL_S = 0.25


def get_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None or not engine.running:
        raise EngineUnavailable("the engine is not running")
    return engine


@router.get("/health")
async def health(request: Request) -> dict:
    engine = get_engine(request)
    return {"status": "ok", "model": engine.model_name, **engine.stats(), "adapters": engine.registry.stats()}


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(auth.inference)])
async def list_models(request: Request) -> ModelList:
    engine = get_engine(request)
    created = request.app.state.created
    base = engine.model_name
    cards = [ModelCard(id=base, created=created, owned_by="adapter-server")]
    cards += [ModelCard(id=name, created=created, owned_by="adapter-server", parent=base) for name in engine.registry.names()]
    return ModelList(data=cards)


@router.post("/v1/completions", response_model=CompletionResponse, dependencies=[Depends(auth.inference)])
async def completions(body: CompletionRequest, request: Request):
    engine = get_engine(request)
    settings, metrics = request.app.state.settings, request.app.state.metrics
    check_supported(body)
    prompts = await prompt_token_ids(engine, settings, body.prompt)
    limits.check_request(settings, prompts, body.max_tokens, body.adapters, body.stop_token_ids, engine.info.vocab_size)
    params = sampling_params(body)
    rid = getattr(request.state, "request_id", "") or uuid.uuid4().hex
    slots = request.app.state.limiter.take(limits.client_key(request), len(prompts))  # 429 past max_streams_per_key
    handles: list[RequestHandle] = []
    try:
        for i, ids in enumerate(prompts):  # each request pins its adapters until it ends (see registry.py)
            setup = await asyncio.to_thread(engine.registry.acquire, body.model, body.adapters)
            try:
                request_id = rid if len(prompts) == 1 else f"{rid}-{i}"
                handles.append(engine.submit(EngineRequest(tuple(ids), params, setup, request_id),
                                             on_done=lambda s=setup: (engine.registry.release(s), slots.release())))
            except BaseException:
                engine.registry.release(setup, served=False)
                raise
    except BaseException:
        slots.release(len(prompts) - len(handles))  # submitted ones give theirs back when they end
        cancel(handles)
        raise
    for name in body.adapters or [body.model]:  # names that resolved: a bounded label set
        metrics.adapter_requests.labels(name).inc(len(prompts))
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(sse(handles, completion_id, created, body.model, usage), media_type="text/event-stream")
    results = await wait_all(request, handles)
    if results is None:  # the client went away; nobody reads this
        return Response(status_code=499)
    return CompletionResponse(
        id=completion_id,
        created=created,
        model=body.model,
        choices=[CompletionChoice(index=i, text=c.text, logprobs=logprobs_object(c.logprobs),
                                  finish_reason=finish(c.finish_reason)) for i, c in enumerate(results)],
        usage=usage_of(results),
    )


# ---------------------------------------------------------------------- request -> engine
def check_supported(body: CompletionRequest) -> None:
    if body.n != 1 or (body.best_of or 1) != 1:
        raise InvalidRequest("only n=1 (and best_of=1) is supported; send one prompt per choice instead")
    if body.presence_penalty or body.frequency_penalty or body.logit_bias:
        raise InvalidRequest("presence_penalty, frequency_penalty and logit_bias are not supported")
    if body.suffix:
        raise InvalidRequest("suffix is not supported")


async def prompt_token_ids(engine: Engine, settings, prompt: Prompt) -> list[list[int]]:
    """Each prompt (a string or a list of token ids) becomes one choice."""
    if isinstance(prompt, str):
        return await limits.encode_texts(engine, settings, [prompt])
    if not prompt:
        raise InvalidRequest("prompt must not be empty")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    encoded = iter(await limits.encode_texts(engine, settings, [p for p in prompt if isinstance(p, str)]))
    return [next(encoded) if isinstance(p, str) else list(p) for p in prompt]


def sampling_params(body: CompletionRequest) -> SamplingParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(
        max_tokens=16 if body.max_tokens is None else body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),
        seed=body.seed,
        stop=stop,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        logprobs=body.logprobs,
        echo=body.echo,
    )


def cancel(handles: Sequence[RequestHandle]) -> None:
    for h in handles:
        h.cancel()


async def wait_all(request: Request, handles: Sequence[RequestHandle]) -> list[Completion] | None:
    """Every handle's completion, or None (and every request cancelled) if the client leaves."""
    task = asyncio.ensure_future(asyncio.gather(*(h.aresult() for h in handles)))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                return None
    finally:
        cancel(handles)  # a no-op for finished requests


# ---------------------------------------------------------------------- engine -> response
def finish(reason: str | None) -> str | None:
    return reason if reason in ("stop", "length") else None


NO_PROBABILITY = -9999.0  # what a log-probability of -inf is shown as (JSON has no infinities; vLLM does the same)


def json_logprob(value: float | None) -> float | None:
    """A log-probability JSON can carry: -inf -> NO_PROBABILITY, NaN -> None."""
    if value is None or math.isfinite(value):
        return value
    return NO_PROBABILITY if value == float("-inf") else None


def logprobs_object(entries: Sequence[TokenLogprob] | None) -> Logprobs | None:
    if entries is None:
        return None
    return Logprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[json_logprob(e.logprob) for e in entries],
        top_logprobs=[None if e.top is None else {k: v for k, v in ((k, json_logprob(v)) for k, v in e.top.items())
                                                  if v is not None} for e in entries],
        text_offset=[e.offset for e in entries],
    )


def usage_of(results: Sequence[Completion | Event]) -> Usage:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def merged(handles: Sequence[RequestHandle]) -> AsyncIterator[tuple[int, Event]]:
    """(choice index, event) from all handles, as they arrive."""
    inbox: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, handle: RequestHandle) -> None:
        async for event in handle:
            await inbox.put((index, event))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(handles)
        while remaining:
            index, event = await inbox.get()
            remaining -= event.finish_reason is not None or event.error is not None
            yield index, event
    finally:
        for t in tasks:
            t.cancel()


def sse_data(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, allow_nan=False)}\n\n"


async def sse(handles: Sequence[RequestHandle], completion_id: str, created: int, model: str,
              include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per event with text, an error chunk if one fails, [DONE]."""
    head = {"id": completion_id, "object": "text_completion", "created": created, "model": model}
    finals: list[Event] = []
    try:
        async for index, event in merged(handles):
            if event.error is not None:
                yield sse_data(errors.describe(event.error)[1])
                break
            if event.finish_reason is not None:
                finals.append(event)
            if not (event.text or event.logprobs or event.finish_reason):
                continue  # text held back (a possible stop string): nothing to say yet
            lp = logprobs_object(event.logprobs) if handles[index].request.params.logprobs is not None else None
            choice = CompletionChoice(index=index, text=event.text, logprobs=lp, finish_reason=finish(event.finish_reason))
            yield sse_data({**head, "choices": [choice.model_dump()]})
        else:
            if include_usage:
                yield sse_data({**head, "choices": [], "usage": usage_of(finals).model_dump()})
        yield sse_data("[DONE]")
    finally:
        cancel(handles)  # the client disconnected, or a request failed: stop the rest
