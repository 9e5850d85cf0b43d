"""Per-request limits of the completions endpoint, each refused with a message naming its
setting: prompt tokens and max_tokens (400), adapters per stack (400), and concurrent engine
requests per API key, or per client host when the server has no keys (429)."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Sequence

from fastapi import Request

from adapter_runtime.errors import CapacityExceeded, InvalidRequest

from .settings import Settings


def check_request(settings: Settings, prompts: Sequence[Sequence[int]], max_tokens: int | None,
                  adapters: Sequence[str] | None) -> None:
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

    def in_use(self, key: str) -> int:
        with self._lock:
            return self._used[key]
