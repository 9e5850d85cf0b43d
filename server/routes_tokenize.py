"""vLLM's tokenizer endpoints: POST /tokenize (a prompt, or chat messages through the chat
template), POST /detokenize and GET /tokenizer_info. Together they are the "remote tokenizer"
that lm-evaluation-harness's local-completions model detects and uses by default
(`tokenizer_backend=auto`: it GETs /tokenizer_info and needs its `eos_token`, then POSTs
/tokenize and /detokenize), so it needs no tokenizer of its own. Base model and adapters
share one tokenizer; `model`, when given, must name one of them."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request

from adapter_runtime.engine import Engine
from adapter_runtime.errors import InvalidRequest

from . import auth, limits
from .deps import get_engine, get_settings
from .routes import model_card
from .routes_chat import chat_prompt_ids
from .schemas import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse, refused_fields
from .settings import Settings

router = APIRouter()


def check_model(engine: Engine, model: str | None) -> None:
    if model is not None:
        model_card(engine, model, 0)  # 404 for an unknown name


@router.post("/tokenize", response_model=TokenizeResponse, response_model_exclude_none=True,
             dependencies=[Depends(auth.inference)])
async def tokenize(body: TokenizeRequest, request: Request, engine: Engine = Depends(get_engine),
                   settings: Settings = Depends(get_settings)) -> TokenizeResponse:
    refused = refused_fields(body)
    if refused:
        raise InvalidRequest(f"{refused[0]} is not supported by /tokenize on this server; remove it", param=refused[0])
    check_model(engine, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequest("send exactly one of prompt or messages", param="prompt")
    if body.prompt is not None:
        special = True if body.add_special_tokens is None else body.add_special_tokens
        limits.check_texts(settings, engine.max_seq_len, [body.prompt])  # before tokenizing
        ids = await asyncio.to_thread(lambda: list(engine.tokenizer(body.prompt, add_special_tokens=special)["input_ids"]))
    else:
        ids = await chat_prompt_ids(request, engine, settings, body, bool(body.add_special_tokens))
    strs = engine.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=engine.max_seq_len, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, dependencies=[Depends(auth.inference)])
async def detokenize(body: DetokenizeRequest, engine: Engine = Depends(get_engine)) -> DetokenizeResponse:
    check_model(engine, body.model)
    vocab = engine.info.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise InvalidRequest(f"token ids out of range 0..{vocab - 1}: {bad[:5]}", param="tokens")
    return DetokenizeResponse(prompt=await asyncio.to_thread(engine.tokenizer.decode, body.tokens))


@router.get("/tokenizer_info", dependencies=[Depends(auth.inference)])
async def tokenizer_info(request: Request, engine: Engine = Depends(get_engine)) -> dict:
    """Like vLLM's: the tokenizer's class, special tokens, context length and the chat template
    chat requests use (None when the server has none)."""
    tok = engine.tokenizer
    specials = {k: str(v) for k, v in tok.special_tokens_map.items() if isinstance(v, str) or hasattr(v, "content")}
    return {"tokenizer_class": type(tok).__name__, "eos_token": None, "bos_token": None, "pad_token": None,
            "unk_token": None, **specials, "model_max_length": engine.max_seq_len,
            "chat_template": getattr(request.app.state, "chat_template", None)}
