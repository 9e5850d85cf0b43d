"""An engine without a model, for testing the HTTP layer in-process (tests/server/): the
surface the routes use (server/deps.get_engine's type), a byte tokenizer, adapters known by
name only, and requests that either answer at once with a fixed text or wait until the test
releases them. What the routes decide (keys, limits, refusals, error shapes, schemas) is
then tested without torch doing any work and without a server process."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from adapter_runtime.engine import EngineConfig, Event, Request, RequestHandle, check_request
from adapter_runtime.errors import AdapterConflict, AdapterNotFound
from adapter_runtime.registry import AdapterStatus
from adapter_runtime.tokenizer import build_byte_tokenizer

ANSWER = "ok"  # what every request generates (one token per character)


@dataclass
class FakeRegistry:
    base_name: str
    adapters: dict[str, str] = field(default_factory=dict)  # name -> method
    store = None  # no adapter store: uploads answer "this server has no adapter store"
    pinned: int = 0

    def models(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def names(self) -> list[str]:
        return list(self.adapters)

    def status(self, name: str) -> AdapterStatus:
        if name not in self.adapters:
            raise AdapterNotFound(f"adapter {name!r} not found")
        return AdapterStatus(name, "peft", self.adapters[name], 10, 40, "device", True, 0, 0)

    def statuses(self) -> list[AdapterStatus]:
        return [self.status(n) for n in self.adapters]

    def stats(self) -> dict:
        return {"adapters": len(self.adapters)}

    def acquire(self, model: str, stack=None) -> tuple:
        names = list(stack or ()) or ([] if model == self.base_name else [model])
        for name in names:
            self.status(name)  # 404 for an unknown name
        self.pinned += 1
        return tuple(names)

    def release(self, setup, served: bool = True) -> None:
        self.pinned -= 1

    def check_free(self, name: str) -> None:
        if name == self.base_name or name in self.adapters:
            raise AdapterConflict(f"an adapter named {name!r} is already registered")


class FakeEngine:
    def __init__(self, name: str = "fake-base", max_seq_len: int = 64, vocab_size: int = 300,
                 adapters: dict[str, str] | None = None):
        self.model_name = name
        self.max_seq_len = max_seq_len
        self.info = SimpleNamespace(vocab_size=vocab_size)
        self.config = EngineConfig(max_batch=4, max_seq_len=max_seq_len)
        self.device = "fake"
        self.tokenizer = build_byte_tokenizer()
        self.registry = FakeRegistry(name, dict(adapters or {}))
        self.merged_name: str | None = None
        self.running = True
        self.busy = False
        self.submitted: list[Request] = []  # every request that reached the engine
        self.hold = False  # True: requests wait for `release()` instead of answering at once
        self.failure: Exception | None = None  # raised by the next submit
        self._held: list[RequestHandle] = []
        self._lock = threading.Lock()

    # the lifecycle the app's lifespan drives
    def start(self) -> "FakeEngine":
        return self

    def stop(self, timeout: float | None = None, grace: float | None = None) -> None:
        self.release()

    def drain(self, grace: float) -> None:
        self.running = False

    def stats(self) -> dict:
        return {"running": len(self._held), "waiting": 0}

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def merge(self, name: str) -> str:
        self.registry.status(name)
        self.merged_name = name
        return name

    def reset(self) -> None:
        self.merged_name = None

    def submit_group(self, requests, on_done=None) -> list[RequestHandle]:
        on_done = list(on_done) if on_done is not None else [None] * len(requests)
        return [self.submit(r, d) for r, d in zip(requests, on_done)]

    def submit(self, request: Request, on_done=None) -> RequestHandle:
        if self.failure is not None:
            error, self.failure = self.failure, None
            raise error
        check_request(request.prompt_ids, request.params, self.info.vocab_size, self.max_seq_len)  # the engine's own
        handle = RequestHandle(request, on_done)
        self.submitted.append(request)
        with self._lock:
            if self.hold:
                self._held.append(handle)
                return handle
        self._answer(handle)
        return handle

    def release(self) -> None:
        """Answer every held request."""
        with self._lock:
            held, self._held = self._held, []
        for handle in held:
            self._answer(handle)

    def wait_for_held(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self._held) < n:
            assert time.monotonic() < deadline, f"{len(self._held)} held requests, expected {n}"
            time.sleep(0.01)

    def _answer(self, handle: RequestHandle) -> None:
        n = min(len(ANSWER), handle.request.params.max_tokens)
        ids = tuple(self.encode(ANSWER[:n]))
        handle._push(Event(text=ANSWER[:n], token_ids=ids, finish_reason="length",
                           prompt_tokens=len(handle.request.prompt_ids), completion_tokens=n))
