"""HTTP routes: OpenAI-style completions and models, plus a health check; the helpers that
chat completions (routes_chat.py) share: field checks, sampling parameters, submitting one
engine request per choice, best_of, server-sent events."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from dataclasses import replace
from importlib.metadata import version as package_version
from typing import AsyncIterator, Callable, Sequence

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from adapter_runtime.composition import adapter_names, request_rows
from adapter_runtime.engine import Completion, Engine, Event, RequestHandle, TokenLogprob
from adapter_runtime.engine import Request as EngineRequest
from adapter_runtime.errors import AdapterNotFound, InvalidRequest
from adapter_runtime.layout import row_layout
from adapter_runtime.sampling import SamplingParams

from . import auth, errors, limits
from .deps import get_engine, get_settings
from .schemas import (REFUSED_COMPLETIONS, CompletionChoice, CompletionRequest, CompletionResponse, Logprobs, ModelCard,
                      ModelList, Prompt, SamplingRequest, Usage, refused_fields)
from .settings import Settings

router = APIRouter()

DISCONNECT_POLL_S = 0.25


@router.get("/health")
async def health(engine: Engine = Depends(get_engine)) -> dict:
    return {"status": "ok", "model": engine.model_name, **engine.stats(), "adapters": engine.registry.stats()}


def model_card(engine: Engine, name: str, created: int) -> ModelCard:
    """The base model's card, or an adapter's (AdapterNotFound, 404, for an unknown name)."""
    base = engine.model_name
    if name == base:
        return ModelCard(id=base, created=created, owned_by="adapter-server", root=base, max_model_len=engine.max_seq_len)
    status = engine.registry.status(name)
    return ModelCard(id=name, created=status.created or created, owned_by="adapter-server", root=base, parent=base,
                     max_model_len=engine.max_seq_len)


@router.get("/version")
async def version() -> dict:
    return {"version": package_version("adapter-server")}


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(auth.inference)])
async def list_models(request: Request, engine: Engine = Depends(get_engine)) -> ModelList:
    created = request.app.state.created
    cards = []
    for name in engine.registry.models():
        try:
            cards.append(model_card(engine, name, created))
        except AdapterNotFound:  # deleted meanwhile
            continue
    return ModelList(data=cards)


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, dependencies=[Depends(auth.inference)])
async def retrieve_model(model_id: str, request: Request, engine: Engine = Depends(get_engine)) -> ModelCard:
    return model_card(engine, model_id, request.app.state.created)


@router.post("/v1/completions", response_model=CompletionResponse, dependencies=[Depends(auth.inference)])
async def completions(body: CompletionRequest, request: Request, engine: Engine = Depends(get_engine),
                      settings: Settings = Depends(get_settings)):
    check_fields(body, REFUSED_COMPLETIONS)
    prompts = await prompt_token_ids(engine, settings, body.prompt)
    limits.check_request(settings, prompts, body.max_tokens, adapter_names(body.adapters), body.stop_token_ids,
                         engine.info.vocab_size)
    params = sampling_params(body, 16 if body.max_tokens is None else body.max_tokens, body.logprobs, body.echo)
    handles = await submit_choices(request, engine, settings, body, prompts, params)
    per_prompt = len(handles) // len(prompts)  # engine requests per prompt: best_of or n, times Parallel channels
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": body.model}
    if body.stream:
        return StreamingResponse(sse(handles, head, completion_chunk(handles), include_usage(body), per_prompt),
                                 media_type="text/event-stream")
    results = await wait_all(request, handles)
    if results is None:  # the client went away; nobody reads this
        return Response(status_code=499)
    chosen = best_choices(results, body.n, choices_per_prompt(body))
    return CompletionResponse(
        **head,
        choices=[CompletionChoice(index=i, text=c.text, logprobs=logprobs_object(c.logprobs),
                                  finish_reason=finish(c.finish_reason)) for i, c in enumerate(chosen)],
        usage=usage_of(results, per_prompt),
    )


# ---------------------------------------------------------------------- request -> engine
def check_fields(body: SamplingRequest, endpoint_rules: dict | None = None) -> None:
    """400 for a field this server would not honour (see schemas.REFUSED) and for n/best_of
    combinations it cannot serve."""
    refused = refused_fields(body, endpoint_rules)
    if refused:
        raise InvalidRequest(f"{refused[0]} is not supported by this server (it would change the output, and the "
                             f"server never ignores such a field); remove it", param=refused[0])
    if body.best_of is not None and body.best_of < body.n:
        raise InvalidRequest(f"best_of ({body.best_of}) must be >= n ({body.n})", param="best_of")
    if body.stream and choices_per_prompt(body) != body.n:
        raise InvalidRequest("best_of > n cannot be streamed: the best choices are known only at the end",
                             param="best_of")


def choices_per_prompt(body: SamplingRequest) -> int:
    """Engine requests per prompt: best_of of them when given, else n."""
    return body.best_of or body.n


def adapter_model(engine: Engine, body: SamplingRequest) -> str:
    """`model`, or LoRAX's `adapter_id` (an alias of `model`: the adapter to use)."""
    if body.adapter_id is None or body.adapter_id == body.model:
        return body.model
    if body.model != engine.model_name:
        raise InvalidRequest(f"model {body.model!r} and adapter_id {body.adapter_id!r} name different adapters; "
                             f"send one of them (adapter_id is an alias of model)", param="adapter_id")
    return body.adapter_id


def include_usage(body: SamplingRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


async def prompt_token_ids(engine: Engine, settings: Settings, prompt: Prompt) -> list[list[int]]:
    """Each prompt (a string or a list of token ids) becomes one choice."""
    if isinstance(prompt, str):
        return await limits.encode_texts(engine, settings, [prompt])
    if not prompt:
        raise InvalidRequest("prompt must not be empty")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    encoded = iter(await limits.encode_texts(engine, settings, [p for p in prompt if isinstance(p, str)]))
    return [next(encoded) if isinstance(p, str) else list(p) for p in prompt]


def sampling_params(body: SamplingRequest, max_tokens: int, logprobs: int | None, echo: bool = False) -> SamplingParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),
        seed=body.seed,
        stop=stop,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        echo=echo,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=logit_bias(body.logit_bias),
        min_tokens=body.min_tokens,
    )


def logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} as (id, bias) pairs; the engine checks ids and ranges."""
    pairs = []
    for key, value in (bias or {}).items():
        try:
            pairs.append((int(key), float(value)))
        except ValueError:
            raise InvalidRequest(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
    return tuple(sorted(pairs))


def choice_seed(seed: int | None, choice: int) -> int | None:
    """Choice i of a seeded request samples with seed + i (as vLLM does): n choices are n
    different streams, each reproducible, and choice 0 equals the same request with n=1."""
    if seed is None:
        return None
    seed += choice
    return seed - (1 << 64) if seed >= 1 << 64 else seed


def context_room(engine: Engine, ids: Sequence[int], setup, settings: Settings) -> int:
    """max_tokens when a request gives none (chat): the rest of the context, within max_tokens_limit."""
    lay = row_layout(setup)
    room = max(engine.max_seq_len - len(ids) - lay.prefix_len - lay.virtual_tokens, 0)
    return room if settings.max_tokens_limit is None else min(room, settings.max_tokens_limit)


async def submit_choices(request: Request, engine: Engine, settings: Settings, body: SamplingRequest,
                         prompts: Sequence[Sequence[int]], params: SamplingParams,
                         open_ended: bool = False) -> list[RequestHandle]:
    """One engine request per choice (best_of, else n, per prompt and per Parallel channel;
    prompt-major, then channel order), each with its own seed (`choice_seed`); a row's choices
    are submitted as one group, so the engine prefills their prompt once. BatchSplit and
    MultiTask give each prompt its child (composition.request_rows). `open_ended`: max_tokens
    is the rest of the context."""
    metrics = request.app.state.metrics
    model, count = adapter_model(engine, body), choices_per_prompt(body)
    rows = request_rows(body.adapters, len(prompts))  # per prompt: each engine row's adapters
    total = sum(len(r) for r in rows) * count
    rid = getattr(request.state, "request_id", "") or uuid.uuid4().hex
    slots = request.app.state.limiter.take(limits.client_key(request), total)  # 429 past max_streams_per_key
    handles: list[RequestHandle] = []
    try:
        for i, ids in enumerate(prompts):
            for adapters in rows[i]:
                # the choices of one row go together: they share the prompt's prefill (engine.submit_group)
                setups, group = [], []
                try:
                    for j in range(count):
                        # each request pins its adapters until it ends (see registry.py)
                        setups.append(await asyncio.to_thread(engine.registry.acquire, model, adapters))
                        p = replace(params, seed=choice_seed(params.seed, j))
                        if open_ended:
                            p = replace(p, max_tokens=context_room(engine, ids, setups[-1], settings))
                        request_id = rid if total == 1 else f"{rid}-{len(handles) + j}"
                        group.append(EngineRequest(tuple(ids), p, setups[-1], request_id))
                    done = [lambda s=s: (engine.registry.release(s), slots.release()) for s in setups]
                    handles.extend(engine.submit_group(group, done))
                except BaseException:
                    for setup in setups:
                        engine.registry.release(setup, served=False)
                    raise
    except BaseException:
        slots.release(total - len(handles))  # submitted ones give theirs back when they end
        cancel(handles)
        raise
    for name in adapter_names(body.adapters) or [model]:  # names that resolved: a bounded label set
        metrics.adapter_requests.labels(name).inc(total)
    return handles


def best_choices(results: Sequence[Completion], n: int, per_prompt: int) -> list[Completion]:
    """The n choices of each prompt: all of them, or with best_of the n with the highest
    cumulative log-probability (in generation order among equals)."""
    if per_prompt == n:
        return list(results)
    chosen: list[Completion] = []
    for start in range(0, len(results), per_prompt):
        group = results[start : start + per_prompt]
        chosen += sorted(group, key=lambda c: -c.cumulative_logprob)[:n]
    return chosen


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


def usage_of(results: Sequence[Completion | Event], per_prompt: int = 1) -> Usage:
    """Each prompt counted once; every generated token counted (best_of's unreturned ones too)."""
    prompt = sum(r.prompt_tokens for r in results[::per_prompt])
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


ChunkChoice = Callable[[int, Event], "dict | None"]  # (choice index, event) -> a chunk's choice, or None


def completion_chunk(handles: Sequence[RequestHandle]) -> ChunkChoice:
    def choice(index: int, event: Event) -> dict | None:
        if not (event.text or event.logprobs or event.finish_reason):
            return None  # text held back (a possible stop string): nothing to say yet
        lp = logprobs_object(event.logprobs) if handles[index].request.params.logprobs is not None else None
        return CompletionChoice(index=index, text=event.text, logprobs=lp, finish_reason=finish(event.finish_reason)).model_dump()

    return choice


async def sse(handles: Sequence[RequestHandle], head: dict, chunk_choice: ChunkChoice, include_usage: bool,
              per_prompt: int, opening: Sequence[dict] = ()) -> AsyncIterator[str]:
    """Server-sent events: the `opening` choices, one chunk per event that says something, an
    error chunk if a request fails, the usage chunk if asked, [DONE]."""
    finals: dict[int, Event] = {}
    try:
        for choice in opening:
            yield sse_data({**head, "choices": [choice]})
        async for index, event in merged(handles):
            if event.error is not None:
                yield sse_data(errors.describe(event.error)[1])
                break
            if event.finish_reason is not None:
                finals[index] = event
            choice = chunk_choice(index, event)
            if choice is not None:
                yield sse_data({**head, "choices": [choice]})
        else:
            if include_usage:
                usage = usage_of([finals[i] for i in sorted(finals)], per_prompt)
                yield sse_data({**head, "choices": [], "usage": usage.model_dump()})
        yield sse_data("[DONE]")
    finally:
        cancel(handles)  # the client disconnected, or a request failed: stop the rest
