"""POST /v1/chat/completions: messages rendered with the base model's chat template (or the
server's --chat-template), then served exactly like a completion of those token ids."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Sequence

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from adapter_runtime.composition import adapter_names
from adapter_runtime.engine import Engine, Event, TokenLogprob
from adapter_runtime.errors import InvalidRequest, ModelLoadError
from adapter_runtime.tokenizer import render_chat

from . import auth, limits
from .deps import get_engine, get_settings
from .routes import (best_choices, check_fields, choices_per_prompt, finish, include_usage, json_logprob, sampling_params,
                     sse, submit_choices, usage_of, wait_all)
from .schemas import (REFUSED_CHAT, ChatChoice, ChatCompletionRequest, ChatLogprobs, ChatMessage, ChatMessageOut,
                      ChatCompletionResponse, ChatTemplateFields, ChatTokenLogprob, TopLogprob)
from .settings import Settings

router = APIRouter()


def load_chat_template(value: str | None, tokenizer) -> str | None:
    """The template chat requests use: --chat-template (a file, or the template itself when it
    is not a path and looks like Jinja), else the tokenizer's own, else None (chat refused)."""
    if value is None:
        return getattr(tokenizer, "chat_template", None) or None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise ModelLoadError(f"--chat-template {value!r}: no such file")


def chat_template(request: Request) -> str:
    template = getattr(request.app.state, "chat_template", None)
    if template is None:
        raise InvalidRequest("the base model's tokenizer has no chat template: start the server with "
                             "--chat-template FILE (a Jinja chat template), or use /v1/completions", param="messages")
    return template


def template_messages(messages: Sequence[ChatMessage]) -> list[dict]:
    """Messages as chat templates expect them: text content parts joined into one string (as
    vLLM does); any other content part is refused."""
    out = []
    for i, m in enumerate(messages):
        message = m.model_dump(exclude_none=True)
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequest(f"messages[{i}].content[{j}]: only text content parts are supported, got "
                                         f"type {part.get('type')!r}", param=f"messages.{i}.content")
                texts.append(part["text"])
            content = "\n".join(texts)
        message["content"] = content or ""
        out.append(message)
    return out


async def chat_prompt_ids(request: Request, engine: Engine, settings: Settings, body: ChatTemplateFields,
                          add_special_tokens: bool) -> list[int]:
    """The prompt token ids of chat messages, refused by size before rendering (the messages'
    text counts against the prompt character limit), rendered off the event loop."""
    template = chat_template(request)
    messages = template_messages(body.messages)
    limits.check_texts(settings, engine.max_seq_len, ["".join(m["content"] for m in messages)])
    return await asyncio.to_thread(render_chat, engine.tokenizer, messages, template, body.add_generation_prompt,
                                   body.continue_final_message, add_special_tokens, body.chat_template_kwargs)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, dependencies=[Depends(auth.inference)])
async def chat_completions(body: ChatCompletionRequest, request: Request, engine: Engine = Depends(get_engine),
                           settings: Settings = Depends(get_settings)):
    check_fields(body, REFUSED_CHAT)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    ids = await chat_prompt_ids(request, engine, settings, body, body.add_special_tokens)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    limits.check_request(settings, [ids], max_tokens, adapter_names(body.adapters), body.stop_token_ids,
                         engine.info.vocab_size)
    params = sampling_params(body, max_tokens or 0, (body.top_logprobs or 0) if body.logprobs else None)
    handles = await submit_choices(request, engine, settings, body, [ids], params, open_ended=max_tokens is None)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    if body.stream:
        opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                   for i in range(len(handles))]  # n, times the channels of a Parallel
        return StreamingResponse(sse(handles, {**head, "object": "chat.completion.chunk"},
                                     chat_chunk(engine, body.logprobs), include_usage(body), len(handles), opening),
                                 media_type="text/event-stream")
    results = await wait_all(request, handles)
    if results is None:  # the client went away; nobody reads this
        return Response(status_code=499)
    choices = [ChatChoice(index=i, message=ChatMessageOut(content=c.text),
                          logprobs=chat_logprobs(engine, c.logprobs) if body.logprobs else None,
                          finish_reason=finish(c.finish_reason))
               for i, c in enumerate(best_choices(results, body.n, choices_per_prompt(body)))]
    return ChatCompletionResponse(**head, choices=choices, usage=usage_of(results, len(results)))


def chat_chunk(engine: Engine, logprobs: bool):
    def choice(index: int, event: Event) -> dict | None:
        if not (event.text or event.logprobs or event.finish_reason):
            return None  # text held back (a possible stop string): nothing to say yet
        lp = chat_logprobs(engine, event.logprobs) if logprobs else None
        return {"index": index, "delta": {"content": event.text} if event.text else {},
                "logprobs": lp.model_dump() if lp is not None else None, "finish_reason": finish(event.finish_reason)}

    return choice


def chat_logprobs(engine: Engine, entries: Sequence[TokenLogprob] | None) -> ChatLogprobs:
    """The engine's per-token log-probabilities in chat's shape (token, logprob, UTF-8 bytes,
    the top alternatives most likely first)."""

    def top(token_id: int, logprob: float) -> TopLogprob:
        text = engine.tokenizer.decode([token_id])
        return TopLogprob(token=text, logprob=json_logprob(logprob), bytes=list(text.encode()))

    return ChatLogprobs(content=[
        ChatTokenLogprob(token=e.token, logprob=json_logprob(e.logprob), bytes=list(e.token.encode()),
                         top_logprobs=[top(t, v) for t, v in e.top_ids if json_logprob(v) is not None])
        for e in entries or () if e.logprob is not None and json_logprob(e.logprob) is not None
    ])
