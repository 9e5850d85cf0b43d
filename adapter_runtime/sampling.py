"""Per-request sampling, log-probabilities, stop strings and incremental detokenization.

Small pure functions over one row of logits [V]. Each request owns a `torch.Generator`, so
a seeded request draws the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .errors import InvalidRequest

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the text ends before the first stop string
    stop_token_ids: tuple[int, ...] = ()  # extra end tokens (besides the model's eos)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N log-probabilities per token; None = none
    echo: bool = False  # return the prompt (and its logprobs) before the completion

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)


def check(params: SamplingParams) -> None:
    """Raise `InvalidRequest` naming the first out-of-range field."""
    if params.max_tokens < 0:
        raise InvalidRequest(f"max_tokens must be >= 0, got {params.max_tokens}")
    if params.temperature < 0:
        raise InvalidRequest(f"temperature must be >= 0, got {params.temperature}")
    if not 0.0 < params.top_p <= 1.0:
        raise InvalidRequest(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise InvalidRequest(f"top_k must be >= 0 (0 = off), got {params.top_k}")
    if params.logprobs is not None and not 0 <= params.logprobs <= MAX_LOGPROBS:
        raise InvalidRequest(f"logprobs must be in 0..{MAX_LOGPROBS}, got {params.logprobs}")
    if any(not s for s in params.stop):
        raise InvalidRequest("stop strings must not be empty")
    if params.seed is not None and not -(1 << 63) <= params.seed < (1 << 64):
        raise InvalidRequest(f"seed must fit in 64 bits, got {params.seed}")


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """The request's own random stream: seeded, or from the OS when no seed is given."""
    seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator(device=device).manual_seed(seed)


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """logits [V] (already divided by the temperature) with tokens outside top-k / the top-p
    nucleus set to -inf. The most likely token always survives."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # mass before this token already exceeds top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from logits [V] (fp32)."""
    if params.greedy:
        return int(logits.argmax())
    # shifted so the largest is 0 before dividing: a tiny temperature (1e-45) gives -inf for the
    # others, never inf - inf = NaN; the same distribution for any temperature
    logits = filter_logits((logits - logits.max()) / params.temperature, params.top_k, params.top_p)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def next_tokens(logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]) -> list[int]:
    """logits [B, V] -> one token per row: one argmax for the batch, a draw per sampled row."""
    tokens = logits.argmax(-1).tolist()
    for b, (p, g) in enumerate(zip(params, generators)):
        if not p.greedy:
            tokens[b] = sample(logits[b], p, g)
    return tokens


def token_logprobs(logits: Tensor, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """logits [V] -> (log p(token), the n most likely (id, logprob) pairs)."""
    logprobs = torch.log_softmax(logits.float(), -1)
    top = torch.topk(logprobs, n) if n > 0 else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return float(logprobs[token]), pairs


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index of the earliest stop string in text[start:] (as an index into text), or None."""
    hits = [i for s in stops if (i := text.find(s, start)) != -1]
    return min(hits) if hits else None


class Detokenizer:
    """Token ids in, text deltas out, never half a UTF-8 character.

    It decodes a short window of recent ids twice (without and with the new tokens) and emits
    the difference once it no longer ends in U+FFFD, so tokenizers whose pieces depend on their
    left neighbour (leading spaces, byte fallback) give the same text as one full decode."""

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(context)
        self.prefix = max(len(self.ids) - 5, 0)  # window start: a little left context
        self.read = len(self.ids)  # ids before this are already emitted as text

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._delta(final=False)

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character becomes U+FFFD)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""
