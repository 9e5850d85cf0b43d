"""Per-request limits, each refused with a message naming its setting: prompt characters
(before tokenizing), prompt tokens and max_tokens (400), stop_token_ids outside the vocabulary
(400), adapters per stack (400), and concurrent engine requests per API key, or per client
host when the server has no keys (429).

Every route that takes a prompt (completions, chat) calls the same two helpers:
`encode_texts` (character limit and Unicode check, then the tokenizer on a worker thread, never
on the event loop) and `check_request` (token limits, stop_token_ids, stack size)."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Sequence

from fastapi import Request

from adapter_runtime.errors import CapacityExceeded, InvalidRequest

from .settings import Settings


CHARS_PER_TOKEN = 8  # a prompt string may have this many characters per token of the token limit


def max_prompt_chars(settings: Settings, max_seq_len: int) -> int:
    """`max_prompt_chars` if set, else CHARS_PER_TOKEN x the token limit (max_prompt_tokens,
    else the context length): far above any real text's characters per token, yet it bounds
    the tokenizer's work before it starts."""
    if settings.max_prompt_chars is not None:
        return settings.max_prompt_chars
    return CHARS_PER_TOKEN * (settings.max_prompt_tokens or max_seq_len)


def check_texts(settings: Settings, max_seq_len: int, texts: Sequence[str]) -> None:
    limit = max_prompt_chars(settings, max_seq_len)
    for text in texts:
        if len(text) > limit:
            raise InvalidRequest(f"the prompt has {len(text)} characters, over this server's limit of {limit} "
                                 f"(max_prompt_chars; by default {CHARS_PER_TOKEN} per token of the token limit)")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequest(f"the prompt is not valid Unicode: it holds a lone surrogate (U+{ord(e.object[e.start]):04X}) "
                                 f"at character {e.start}") from None


async def encode_texts(engine, settings: Settings, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, refused by size before tokenizing; the tokenizer runs on a
    worker thread so that a long prompt never stalls the event loop (health checks, streams)."""
    check_texts(settings, engine.max_seq_len, texts)
    if not texts:
        return []
    return await asyncio.to_thread(lambda: [engine.encode(t) for t in texts])


def check_request(settings: Settings, prompts: Sequence[Sequence[int]], max_tokens: int | None,
                  adapters: Sequence[str] | None, stop_token_ids: Sequence[int] | None = None,
                  vocab_size: int | None = None) -> None:
    if vocab_size is not None and stop_token_ids:
        bad = [t for t in stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequest(f"stop_token_ids must be token ids in 0..{vocab_size - 1}, got {bad[:5]}")
    if settings.max_prompt_tokens is not None:
        longest = max((len(p) for p in prompts), default=0)
        if longest > settings.max_prompt_tokens:
            raise InvalidRequest(f"the prompt has {longest} tokens, over max_prompt_tokens={settings.max_prompt_tokens}")
    if settings.max_tokens_limit is not None and max_tokens is not None and max_tokens > settings.max_tokens_limit:
        raise InvalidRequest(f"max_tokens={max_tokens} is over this server's max_tokens_limit={settings.max_tokens_limit}")
    if adapters is not None and len(adapters) > settings.max_stack_adapters:
        raise InvalidRequest(f"the adapter stack has {len(adapters)} adapters, over max_stack_adapters="
                             f"{settings.max_stack_adapters}")


def client_key(request: Request) -> str:
    """Whom a concurrency limit counts: the bearer token, else the client's host."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return "key:" + token.strip()
    return "host:" + (request.client.host if request.client else "?")


class Slots:
    """`n` concurrency slots of one client; `release` returns them one at a time (any thread)."""

    def __init__(self, limiter: "StreamLimiter", key: str):
        self.limiter, self.key = limiter, key

    def release(self, n: int = 1) -> None:
        if n > 0:
            self.limiter._give_back(self.key, n)


class StreamLimiter:
    """At most `limit` engine requests (streaming or not) in flight per client key."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self._lock = threading.Lock()
        self._used: Counter[str] = Counter()

    def take(self, key: str, n: int) -> Slots:
        with self._lock:
            if self.limit is not None and self._used[key] + n > self.limit:
                raise CapacityExceeded(f"too many concurrent requests for this client: {self._used[key]} running, "
                                       f"{n} more asked, max_streams_per_key={self.limit}; retry later")
            self._used[key] += n
        return Slots(self, key)

    def _give_back(self, key: str, n: int) -> None:
        with self._lock:
            self._used[key] -= n
            if self._used[key] <= 0:
                del self._used[key]
