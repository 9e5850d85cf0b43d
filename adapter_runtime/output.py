"""Per-request output processing: incremental detokenization, stop conditions, OpenAI-style
log-probabilities and the events a request's handle receives. No model, no torch work beyond
reading a row of logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from torch import Tensor

from . import sampling


@dataclass(frozen=True)
class TokenLogprob:
    """One entry of OpenAI's legacy `logprobs` object."""

    token: str
    logprob: float | None  # None for the first prompt token (nothing predicts it)
    top: dict[str, float] | None
    offset: int  # character offset of the token in the returned text
    token_id: int = -1
    top_ids: tuple[tuple[int, float], ...] = ()  # the n most likely (token id, logprob), most likely first


@dataclass(frozen=True)
class Event:
    """A piece of one request's output. The last event has `finish_reason` (or `error`)."""

    text: str = ""
    token_ids: tuple[int, ...] = ()  # generated tokens in this event
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Exception | None = None
    cumulative_logprob: float = 0.0  # last event: sum of the generated tokens' log-probabilities


class RequestOutput:
    """What one request has produced so far, and what of it may be sent."""

    def __init__(self, prompt_ids: Sequence[int], params: sampling.SamplingParams, tokenizer, eos_token_ids,
                 push: Callable[[Event], None]):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.push = push
        self.detok = sampling.Detokenizer(tokenizer, () if params.echo else prompt_ids)
        self.generated: list[int] = []
        self.text = ""  # completion text so far (stop strings already cut off)
        self.emitted = 0  # characters of `text` already sent
        self.offset = 0  # characters of the returned text before the completion (the echoed prompt)
        self.prompt_entries: list[TokenLogprob] = []  # echo: prompt logprobs, gathered chunk by chunk
        self._prompt_text = ""

    def _token_str(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _logprob(self, logits: Tensor, token: int, n: int, offset: int) -> TokenLogprob:
        """logits [V] predicting `token`: its logprob and the n most likely alternatives."""
        lp, top = sampling.token_logprobs(logits, token, n)
        alternatives: dict[str, float] = {}
        for t, v in top:  # most likely first: tokens that decode alike keep the highest logprob
            alternatives.setdefault(self._token_str(t), v)
        alternatives.setdefault(self._token_str(token), lp)  # the chosen token, as OpenAI lists it
        return TokenLogprob(self._token_str(token), lp, alternatives, offset, token, tuple(top))

    def prompt_chunk(self, start: int, logits: Tensor | None) -> None:
        """Echo: prompt tokens start.. (as many as rows of logits [n, V], or all the rest without
        logits) get their text and, with logits, their logprob given the tokens before them.
        logits[j] predicts prompt token start + j + 1 (the first prompt token has none)."""
        n = self.params.logprobs or 0
        stop = len(self.prompt_ids) if logits is None else min(start + logits.shape[0], len(self.prompt_ids))
        for i in range(start, stop):
            token = self.prompt_ids[i]
            if logits is not None:
                if i == 0:
                    self.prompt_entries.append(TokenLogprob(self._token_str(token), None, None, len(self._prompt_text),
                                                            token))
                else:
                    self.prompt_entries.append(self._logprob(logits[i - 1 - start], token, n, len(self._prompt_text)))
            self._prompt_text += self.detok.push(token)

    def emit_prompt(self) -> None:
        text = self._prompt_text + self.detok.flush()
        self.offset = len(text)
        self.push(Event(text=text, logprobs=tuple(self.prompt_entries), prompt_tokens=len(self.prompt_ids)))

    def accept(self, token: int, logits: Tensor | None) -> Event | None:
        """Record a generated token and emit what is safe to emit (`logits` [V]: the row that
        predicted it, needed only when the request returns logprobs). Returns the final event
        (without its finish fields filled) when the request is done, else None."""
        p = self.params
        self.generated.append(token)
        entry = ()
        if p.logprobs is not None:
            entry = (self._logprob(logits, token, p.logprobs, self.offset + len(self.text)),)
        finish = None
        start = max(len(self.text) - p.max_stop_len + 1, 0)
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            finish = "stop"  # the end token itself adds no text
        else:
            self.text += self.detok.push(token)
            if len(self.generated) >= p.max_tokens:
                finish = "length"
        if finish:
            self.text += self.detok.flush()  # an unfinished character at the very end becomes U+FFFD
        stops = p.stop if len(self.generated) >= p.min_tokens else ()  # vLLM: no stop string before min_tokens
        if stops and (cut := sampling.find_stop(self.text, stops, start)) is not None:
            self.text, finish = self.text[:cut], "stop"
        # hold back a tail that could still become a stop string
        safe = len(self.text) if finish or not p.stop else max(len(self.text) - p.max_stop_len + 1, self.emitted)
        delta = self.text[self.emitted : safe]
        self.emitted = safe
        event = Event(text=delta, token_ids=(token,), logprobs=entry, finish_reason=finish)
        if finish is None:
            self.push(event)
            return None
        return event
