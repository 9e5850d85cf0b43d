"""Per-request sampling, log-probabilities, stop strings and incremental detokenization.

The engine's whole per-step interface is two names:

    state = SamplingState(params, prompt_ids, vocab_size, eos_token_ids, device)  # at admission
    tokens = choose(logits, states)  # each step: logits [B, V] fp32, one state per row;
                                     # None for a row whose logits are not finite

`choose` applies the rows' logits processors in batched tensor ops over [B, V] with per-row
parameter columns (min_tokens, logit_bias, repetition / frequency / presence penalties, in
vLLM's order), picks each row's token (greedy, or a draw from the row's own seeded generator,
so a seeded request draws the same tokens whatever else shares its batch) and updates every
state with its token (output-token counts and seen-token masks on the device, the cumulative
log-probability). Everything else here is small pure
functions the engine uses for log-probabilities, stop strings and detokenization.
"""

from __future__ import annotations

import math
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
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # tokens of the prompt or output: logit / p if > 0, else logit * p
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    min_tokens: int = 0  # end tokens (eos, stop_token_ids) and stop strings only after this many

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def processes_logits(self) -> bool:
        penalized = self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
        return penalized or bool(self.logit_bias) or self.min_tokens > 0

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)


MAX_LOGIT_BIAS = 100.0


def check(params: SamplingParams, vocab_size: int | None = None) -> None:
    """Raise `InvalidRequest` naming the first out-of-range field."""
    if params.max_tokens < 0:
        raise InvalidRequest(f"max_tokens must be >= 0, got {params.max_tokens}")
    if not 0.0 <= params.temperature < math.inf:  # written so that NaN fails it too
        raise InvalidRequest(f"temperature must be a finite number >= 0, got {params.temperature}")
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
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2.0 <= getattr(params, name) <= 2.0:
            raise InvalidRequest(f"{name} must be in [-2, 2], got {getattr(params, name)}")
    if not 0.0 < params.repetition_penalty < math.inf:
        raise InvalidRequest(f"repetition_penalty must be a finite number > 0 (1 = off), got {params.repetition_penalty}")
    if not 0 <= params.min_tokens <= params.max_tokens:
        raise InvalidRequest(f"min_tokens must be in 0..max_tokens ({params.max_tokens}), got {params.min_tokens}")
    for token, bias in params.logit_bias:
        if vocab_size is not None and not 0 <= token < vocab_size:
            raise InvalidRequest(f"logit_bias token id {token} is out of range 0..{vocab_size - 1}")
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise InvalidRequest(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")


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


class SamplingState:
    """One request's sampling state, made when it is admitted and owned by the engine worker.

    `choose` reads it and updates it with each token it picks: the request's generator, how
    many tokens it has generated, the sum of their log-probabilities under the model and, on
    the device and only when a penalty needs them, the counts of the generated tokens and the
    mask of tokens seen in the prompt or the output."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], vocab_size: int,
                 eos_token_ids: Sequence[int], device: torch.device):
        self.params = params
        self.generator = make_generator(params.seed, device)
        self.generated = 0
        self.cumulative_logprob = 0.0  # sum of log p(token) of the generated tokens (raw model logits)
        self.output_counts: Tensor | None = None  # [V] fp32: occurrences of each token in the output
        self.seen: Tensor | None = None  # [V] bool: tokens of the prompt or the output (repetition penalty)
        if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
            self.output_counts = torch.zeros(vocab_size, device=device)
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(list(prompt_ids), dtype=torch.long, device=device)] = True
        ends = () if params.ignore_eos else tuple(eos_token_ids)
        self.end_ids = tuple(dict.fromkeys(ends + params.stop_token_ids))  # what min_tokens holds back


class _Stacked:
    """The per-row device tensors of one step's rows that have them (`attr` of each state),
    stacked once: [R, V] for the R rows listed in `rows`. `put` writes a token into each and
    gives every state back its row (a view), so the next step stacks the updated values."""

    def __init__(self, states: Sequence[SamplingState], attr: str, device: torch.device):
        self.states, self.attr = states, attr
        self.rows = [b for b, s in enumerate(states) if getattr(s, attr) is not None]
        self.index = torch.tensor(self.rows, dtype=torch.long, device=device)  # [R]
        self.values = torch.stack([getattr(states[b], attr) for b in self.rows]) if self.rows else None  # [R, V]

    def param(self, name: str) -> Tensor:
        """The rows' sampling parameter `name` as a column [R, 1]."""
        return torch.tensor([[float(getattr(self.states[b].params, name))] for b in self.rows], device=self.index.device)

    def put(self, chosen: Tensor) -> None:
        """chosen [B]: add one occurrence of each row's token (counts) or mark it (masks)."""
        if not self.rows:
            return
        at = (torch.arange(len(self.rows), device=chosen.device), chosen[self.index])
        if self.values.dtype == torch.bool:
            self.values[at] = True
        else:
            self.values[at] += 1
        for i, b in enumerate(self.rows):
            setattr(self.states[b], self.attr, self.values[i])


def _row_entries(rows: Sequence[int], entries: Sequence[Sequence], device: torch.device) -> tuple[Tensor, ...]:
    """Flatten per-row lists of (token, value) into index tensors (row, token) and values."""
    row_ids = [b for b, e in zip(rows, entries) for _ in e]
    tokens = [t for e in entries for t, _ in e]
    values = [v for e in entries for _, v in e]
    return (torch.tensor(row_ids, dtype=torch.long, device=device), torch.tensor(tokens, dtype=torch.long, device=device),
            torch.tensor(values, dtype=torch.float32, device=device))


def repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """vLLM's repetition penalty on logits [R, V], in place, for the tokens seen [R, V] in the
    prompt or the output, with per-row penalties [R, 1].

    Reference loop: for each row b and token v with seen[b, v]:
        logit = logit / penalty[b] if logit > 0 else logit * penalty[b]"""
    factor = torch.where(logits > 0, 1.0 / penalty, penalty)  # [R, V]
    return logits.mul_(torch.where(seen, factor, 1.0))


def frequency_presence_penalty(logits: Tensor, counts: Tensor, frequency: Tensor, presence: Tensor) -> Tensor:
    """OpenAI's penalties on logits [R, V], in place, given output-token counts [R, V] and
    per-row parameters [R, 1].

    Reference loop: logit[b, v] -= frequency[b] * counts[b, v] + presence[b] * (counts[b, v] > 0)"""
    return logits.sub_(counts * frequency + (counts > 0) * presence)


def process_logits(logits: Tensor, states: Sequence[SamplingState], stacked: dict[str, _Stacked] | None = None) -> Tensor:
    """logits [B, V] (fp32, the model's) -> the logits sampling picks from, each row changed
    only by its own parameters, in vLLM's order: min_tokens, logit_bias, then the repetition,
    frequency and presence penalties. `stacked`: the states' tensors, if `choose` has them."""
    if not any(s.params.processes_logits for s in states):
        return logits
    device = logits.device
    if stacked is None:
        stacked = {attr: _Stacked(states, attr, device) for attr in ("seen", "output_counts")}
    out = logits.clone()
    held = [b for b, s in enumerate(states) if s.generated < s.params.min_tokens and s.end_ids]
    if held:  # no end token before min_tokens
        r, t, _ = _row_entries(held, [[(t, 0.0) for t in states[b].end_ids] for b in held], device)
        out[r, t] = float("-inf")
    biased = [b for b, s in enumerate(states) if s.params.logit_bias]
    if biased:
        r, t, v = _row_entries(biased, [states[b].params.logit_bias for b in biased], device)
        out.index_put_((r, t), v, accumulate=True)
    seen = stacked.get("seen")
    if seen is not None and seen.rows:
        out[seen.index] = repetition_penalty(out[seen.index], seen.values, seen.param("repetition_penalty"))
    counts = stacked.get("output_counts")
    if counts is not None and counts.rows:
        out[counts.index] = frequency_presence_penalty(out[counts.index], counts.values,
                                                       counts.param("frequency_penalty"), counts.param("presence_penalty"))
    return out


def choose(logits: Tensor, states: Sequence[SamplingState]) -> list[int | None]:
    """logits [B, V] (fp32, the model's) -> the next token of each row, or None for a row whose
    logits are not finite (NaN or +inf: an adapter's huge weights overflowed) or, sampled, have
    no finite logit left after its processors (the engine fails that request alone); updates
    each state.

    One max pass for the batch gives the greedy tokens and each row's peak (NaN or +inf exactly
    when the row is broken), one batched log-softmax for the log-probabilities, one draw per
    sampled row from its own generator, one stack and one scatter per kind of penalty state.
    When no row samples, the tokens and their log-probabilities come back to the host in one
    transfer (one device sync per step)."""
    device = logits.device
    stacked = {attr: _Stacked(states, attr, device) for attr in ("seen", "output_counts")
               if any(getattr(s, attr) is not None for s in states)}
    processed = process_logits(logits, states, stacked)  # [B, V]
    # Tensor.max(dim): one vectorized pass with argmax's first-maximum rule (argmax itself ran
    # ~2.8x slower on the CPU at [31, 32000], profiled); log_softmax beat logsumexp there too
    peak, best = logits.max(-1)  # [B]
    finite = peak.isfinite()  # NaN or +inf: the row's logits overflowed
    if processed is not logits:  # a huge repetition_penalty can push every logit of a row to -inf
        processed_peak, best = processed.max(-1)
        finite &= processed_peak.isfinite()
    if all(s.params.greedy for s in states):
        chosen = best  # [B]
        logprobs = torch.log_softmax(logits, -1).gather(1, chosen[:, None])[:, 0]  # [B]
        ids, logprobs, ok = torch.stack([chosen.double(), logprobs.double(), finite.double()]).tolist()
        tokens = [int(t) if good else None for t, good in zip(ids, ok)]  # ids < 2**53: exact
    else:
        tokens, ok = torch.stack([best, finite.long()]).tolist()  # one transfer
        for b, s in enumerate(states):
            if not ok[b]:
                tokens[b] = None
            elif not s.params.greedy:
                tokens[b] = sample(processed[b], s.params, s.generator)
        chosen = torch.tensor([0 if t is None else t for t in tokens], dtype=torch.long, device=device)  # [B]
        logprobs = torch.log_softmax(logits, -1).gather(1, chosen[:, None])[:, 0].tolist()  # [B]
    for st in stacked.values():
        st.put(chosen)
    for s, lp in zip(states, logprobs):
        s.generated += 1
        s.cumulative_logprob += lp
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


def _plain_fast_backend(tokenizer):
    """The Rust tokenizer of a transformers fast tokenizer whose decode is the stock one (no
    subclass changes it), else None."""
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    except ImportError:
        return None
    kind = type(tokenizer)
    if not isinstance(tokenizer, PreTrainedTokenizerFast) or kind.decode is not PreTrainedTokenizerBase.decode \
            or kind._decode is not PreTrainedTokenizerFast._decode:
        return None
    return getattr(tokenizer, "_tokenizer", None)


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
        self.backend = _plain_fast_backend(tokenizer)

    def _decode(self, ids: Sequence[int]) -> str:
        if self.backend is None:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        # what PreTrainedTokenizerFast.decode does, without its per-call Python layers (two
        # decodes per generated token per request add up at batch 32)
        text = self.backend.decode(ids, skip_special_tokens=True)
        return self.tokenizer.clean_up_tokenization(text) if self.tokenizer.clean_up_tokenization_spaces else text

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
