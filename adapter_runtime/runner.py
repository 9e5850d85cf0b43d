"""The model runner: turns a scheduler's `StepPlan` into one packed forward and its logits.

It owns the device side of the engine: the model (its base linears pre-packed/fused), the KV
cache, the adapter banks and, for decode-only steps, the static step: rows padded to a bucket
size and, when compiling, run through a compiled forward whose code path depends on the
bucket and on which bank kinds the step uses, never on which adapters the rows name.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .banks import AdapterBanks
from .batch import ForwardBatch, MergedAdapter, RowSpan, Setup, banked_adapter, build_adapter_step
from .methods import lower_materialize
from .methods import prefix as prefix_method
from .models.common import KVCache, prepack
from .scheduler import StepPlan
from .threads import compute_threads, use_compute_threads

log = logging.getLogger(__name__)


@dataclass
class RowState:
    """What the runner needs of a sequence (the engine's per-request state carries one)."""

    tokens: list[int]  # soft-prompt placeholders + prompt ids
    setup: Setup
    layout: object  # layout.RowLayout
    all_logits: bool  # prefill returns logits for every prompt token (echo with logprobs)
    last: int = 0  # the newest generated token, not yet in the cache

    def decode_span(self, computed: int) -> tuple[int, list[int]]:
        """(index of its first token, tokens) of the row's decode step: the newest token; with
        `layout.recompute` k > 0 the row's last k + 1 tokens, re-run because a ReFT suffix window
        moved (methods/reft.py). Call once per decode step: such rows keep their generated tokens."""
        if not self.layout.recompute:
            return computed, [self.last]
        self.tokens.append(self.last)
        first = max(0, computed - self.layout.recompute)
        return first, self.tokens[first : computed + 1]


class ReusedStep(NamedTuple):
    """The last decode step's adapter part, kept for the next step with the same rows."""

    key: tuple  # (banks.generation after the build, ids of the rows' setups)
    setups: list  # held, so that no other object can take their ids meanwhile
    adapters: object  # batch.AdapterStep
    hidden: dict  # prefix_method.hidden_ranges


def freeze_heap() -> None:
    """Collect, then exempt every object alive now from later garbage collections (gc.freeze,
    as vLLM does after start-up). torch.compile's caches, the model and the tokenizer are
    several hundred thousand objects that live as long as the process; a full collection that
    scans them all stalls the decode step it falls in for 0.5-1 s on the CPU, every few hundred
    steps. Objects made later (per step, per request) are collected as before."""
    gc.collect()
    gc.freeze()


# Python's GIL switch interval while the compile thread runs. Every torch op the worker's eager
# step calls releases the GIL, and taking it back from a thread busy tracing a graph waits up to
# one switch interval: at the default 5 ms an eager step of ~500 ops took 2.4 s during a compile,
# at 1 ms 0.86 s, at 0.2 ms 0.32 s (a 31-row step otherwise ~45 ms; profiled on 2 cores).
COMPILE_SWITCH_INTERVAL_S = 0.0002


def buckets_for(max_batch: int) -> list[int]:
    """Batch sizes a decode step is padded to: powers of four up to max_batch, and max_batch
    (each is one compile; on the CPU a few padding rows cost little: small GEMMs are bound by
    reading the weights)."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 4
    return sizes + [max_batch]


class ModelRunner:
    def __init__(self, model, cache: KVCache, bank_capacity: int, compile: bool = False, buckets: Sequence[int] = (),
                 threads: int | None = None):
        self.model = model
        self.info = model.info
        self.cache = cache
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.banks = AdapterBanks(self.info, bank_capacity, self.device, self.dtype)
        self.scratch_slot = cache.num_slots - 1  # padding rows of a static step write here
        self.buckets = sorted(buckets) or buckets_for(cache.num_slots - 1)
        self.compile = compile
        self.threads = compute_threads(threads)  # the compile thread's: its kernels bake the count in
        # a compiled step reads the cache up to a multiple of this (its length is a dynamic size
        # of the graph; rounding only spares guard checks, and every key read costs bandwidth)
        self.kv_round = 16
        self._compiled = None
        if compile:
            lower_materialize()
            self._compiled = torch.compile(model, dynamic=False)
        self._ready: set = set()  # variants of the static step that are compiled
        self._compiling: dict = {}  # variant -> a step's batch of it, waiting for (or in) the compile thread
        self._lock = threading.Lock()
        self._compiler: threading.Thread | None = None
        self._switch_interval = sys.getswitchinterval()  # restored when the compile thread ends
        self.compile_in_background = True  # False: a step of a new variant waits for its compile (tests)
        # how steps ran (tests, logs and benchmarks read it): "static" decode steps either ran
        # "compiled" or, their variant not compiled yet, "static_eager"; "eager" counts both
        # those and every other (prefill / mixed) step
        self.steps = {"static": 0, "compiled": 0, "static_eager": 0, "eager": 0}
        self.memo: dict = {}  # DoRA factors; cleared whenever base weights change
        self._last_step: ReusedStep | None = None
        self.refresh_weights()

    def refresh_weights(self) -> None:
        """After load, merge or reset: rebuild the pre-packed base ops from the current weights."""
        t = time.perf_counter()
        prepack(self.model)
        self.memo.clear()
        log.debug("base linears pre-packed in %.2fs", time.perf_counter() - t)

    # ------------------------------------------------------------------ one step
    def execute(self, plan: StepPlan, rows: dict, merged: MergedAdapter | None) -> Tensor:
        """Run the plan's tokens (decode rows first) -> logits [M, V]: one row per decode
        sequence, then per prefill chunk its last token's (or, for all_logits rows, every token's)."""
        decode = [rows[id(s)] for s in plan.decode]
        chunks = [(rows[id(c.seq)], c) for c in plan.prefill]
        spans = [r.decode_span(s.computed) for r, s in zip(decode, plan.decode)]  # (first index, tokens)
        tokens = [t for _, t in spans] + [r.tokens[c.start : c.start + c.count] for r, c in chunks]
        positions = [r.layout.positions(i, len(t)) for r, (i, t) in zip(decode, spans)] + \
                    [r.layout.positions(c.start, c.count) for r, c in chunks]
        slots = [s.slot for s in plan.decode] + [c.seq.slot for c in plan.prefill]
        starts = [r.layout.prefix_len + i for r, (i, _) in zip(decode, spans)] + \
                 [r.layout.prefix_len + c.start for r, c in chunks]
        setups = [r.setup for r in decode] + [r.setup for r, _ in chunks]
        every = [False] * len(decode) + [r.all_logits for r, _ in chunks]
        done = [10**9] * len(decode) + [c.start for _, c in chunks]
        # one-token rows must lead the batch: a decode row that re-runs a window moves behind them
        order = sorted(range(len(tokens)), key=lambda b: len(tokens[b]) != 1)
        if order != list(range(len(tokens))):
            tokens, positions, slots, starts, setups, every, done = (
                [xs[b] for b in order] for xs in (tokens, positions, slots, starts, setups, every, done))
        static = not chunks and len(tokens) == len(decode) and all(len(t) == 1 for t in tokens) and \
            self._bucket(len(decode))
        pad = (self._bucket(len(decode)) - len(decode)) if static and self.compile else 0  # eager: no padding
        counts = [len(t) for t in tokens] + [1] * pad
        logit_rows, m = [], 0
        for n, e in zip(counts, every + [False] * pad):
            k = n if e else 1
            logit_rows.append(list(range(m, m + k)))
            m += k
        adapters, hidden = self._adapter_step(list(setups) + [()] * pad, counts, merged, bool(static),
                                              done + [10**9] * pad, logit_rows)
        if pad:
            tokens += [[0]] * pad
            positions += [[0]] * pad
            starts += [0] * pad
            slots += [self.scratch_slot] * pad
        batch = ForwardBatch.build(
            tokens, positions, slots, starts, self.device, adapters=adapters, all_logits=every + [False] * pad,
            prefix_hidden=hidden,
            kv_round=self.kv_round if static and self.compile else 1, read_slots=self._read_slots(slots, pad) if pad else None,
            max_kv=self.cache.max_len,
        )
        logits = self._forward(batch, static and adapters.static_safe())
        if order != list(range(len(order))):  # back to the plan's row order
            place = {b: i for i, b in enumerate(order)}
            logits = logits[[m for b in range(len(order)) for m in logit_rows[place[b]]]]
        return logits[: logits.shape[0] - pad] if pad else logits

    def _adapter_step(self, setups: list, counts: list[int], merged, static: bool, done: list[int], logit_rows):
        """The step's AdapterStep and prefix-hidden ranges. A decode-only step whose rows keep
        the setups of the previous one (the usual case: the same requests, one token further)
        reuses its answer while the banks hold the same slots: building it walks every row's
        adapter and makes the index tensors (~0.5 ms of a 32-LoRA step, profiled)."""
        reusable = static and merged is None  # decode rows only: no prompt vectors, no merge to undo
        ids = tuple(map(id, setups))
        last = self._last_step
        if reusable and last is not None and last.key == (self.banks.generation, ids):
            return last.adapters, last.hidden
        adapters = build_adapter_step(setups, counts, self.device, banks=self.banks, merged=merged, static=static,
                                      memo=self.memo, done=done, logit_rows=logit_rows)
        hidden = prefix_method.hidden_ranges(setups, self.info.num_layers, self.device)
        # keyed by the banks as this build left them (it may have written slots)
        self._last_step = ReusedStep((self.banks.generation, ids), setups, adapters, hidden) if reusable else None
        return adapters, hidden

    def _read_slots(self, slots: list[int], pad: int) -> list[int]:
        """Real rows read their own slots; padding rows read the next slots when the real rows
        sit in 0..D-1 (the whole bucket is then one view of the cache), else the scratch slot."""
        real = slots[: len(slots) - pad]
        if real == list(range(len(real))):
            return list(range(len(slots)))
        return real + [self.scratch_slot] * pad

    def _bucket(self, n: int) -> int:
        return next((b for b in self.buckets if b >= n), 0)

    def _forward(self, batch: ForwardBatch, static: bool) -> Tensor:
        self.steps["static" if static else "eager"] += 1
        if not (static and self.compile):
            return self.model(batch, self.cache)
        key = self._variant(batch)
        if not self.compile_in_background and key not in self._ready:
            self._compile_variant(key, batch)
        with self._lock:
            ready = key in self._ready
            if not ready and key not in self._compiling:
                self._compiling[key] = batch
                if self._compiler is None or not self._compiler.is_alive():
                    # not a daemon: exiting mid-compile aborts the process; close() lets it finish first
                    self._compiler = threading.Thread(target=self._compile_queued, name="compile")
                    self._compiler.start()
        if not ready:  # eager until the background compile of this variant is done
            self.steps["eager"] += 1
            self.steps["static_eager"] += 1
            return self.model(batch, self.cache)
        self.steps["compiled"] += 1
        return self._run_compiled(batch)

    def _run_compiled(self, batch: ForwardBatch) -> Tensor:
        torch._dynamo.maybe_mark_dynamic(batch.decode_keys, 0)  # the cache length grows: one graph per variant
        # one code object, one graph per variant (bucket x bank kinds x shapes): more than dynamo's
        # default limit of 8; its config is per thread, hence the patch on every call
        with torch._dynamo.config.patch(recompile_limit=256, accumulated_recompile_limit=4096):
            return self._compiled(batch, self.cache)

    def _variant(self, batch: ForwardBatch) -> tuple:
        """What a compiled static step depends on: the bucket, how the cache is read, which bank
        kinds and sites the rows use and the banks' shapes - never which adapters they are."""
        ad = batch.adapters
        return (batch.num_tokens, batch.decode_slot_view, tuple(sorted(batch.prefix_hidden)),
                tuple(sorted((k, tuple(sorted(map(repr, v)))) for k, v in ad.active.items())),
                self.banks.signature() if ad.slots else None)

    def _compile_queued(self) -> None:
        """The compile thread: one variant after the other, until none is waiting; meanwhile the
        GIL changes hands every COMPILE_SWITCH_INTERVAL_S, so that the worker's eager steps keep
        their pace (restored under the lock that decides a new compile thread's start)."""
        use_compute_threads(self.threads)
        sys.setswitchinterval(min(self._switch_interval, COMPILE_SWITCH_INTERVAL_S))
        while True:
            with self._lock:
                if not self._compiling:
                    self._compiler = None
                    sys.setswitchinterval(self._switch_interval)
                    return
                key, batch = next(iter(self._compiling.items()))
            self._compile_variant(key, batch)

    def _compile_variant(self, key: tuple, batch: ForwardBatch) -> None:
        """Compile one variant by running it once on a copy of a real step whose rows all write
        to the scratch slot (its output is thrown away); the worker runs eager meanwhile."""
        t = time.perf_counter()
        try:
            with torch.inference_mode():
                # made in inference mode, as the worker's tensors are: dynamo guards on a tensor's
                # dispatch keys, and a normal tensor here made the worker's first real step of every
                # background-compiled variant recompile it, on the worker (a 2-3 s stall, profiled)
                scratch = torch.full_like(batch.write_slots, self.scratch_slot)
                self._run_compiled(replace(batch, write_slots=scratch))
        except Exception:
            log.exception("compiling the static decode step failed; it stays eager")
            with self._lock:
                self._compiling.pop(key, None)
            return
        freeze_heap()
        with self._lock:
            self._ready.add(key)
            self._compiling.pop(key, None)
        log.info("compiled the static decode step for %d rows (%s) in %.1fs", batch.num_tokens,
                 ", ".join(k for k, _ in key[3]) or "no adapters", time.perf_counter() - t)

    def close(self) -> None:
        """Drop queued compiles and wait for the one in progress (at engine stop)."""
        with self._lock:
            self._compiling = {k: v for k, v in list(self._compiling.items())[:1]}
        self.wait_compiled()

    @property
    def compiling(self) -> bool:
        """A compile is queued or in progress (benchmarks wait for none before timing)."""
        with self._lock:
            return self._compiler is not None or bool(self._compiling)

    def wait_compiled(self) -> None:
        """Block until every compile queued so far is done (benchmarks)."""
        while True:
            with self._lock:
                thread = self._compiler
            if thread is None:
                return
            thread.join()

    # ------------------------------------------------------------------ admission, warm-up
    def admit(self, setup: Setup, others: Sequence[Setup]) -> None:
        """Write a newly admitted request's adapter into the banks now (not inside a step), so
        that weights that do not fit fail this request alone."""
        if (adapter := banked_adapter(setup, self.banks.bankable)) is not None:
            in_use = [s for o in others if len(o) == 1 and (s := self.banks.peek(o[0])) is not None]
            self.banks.slot(adapter, in_use)

    def warm_up(self, wait: bool = False) -> None:
        """Start compiling the static decode step for every bucket (base rows, scratch slot) in
        the background, one log line per bucket when done; steps run eager until their variant
        is compiled. Variants that use adapter banks compile the first time they are seen."""
        if not self.compile:
            return
        from .scheduler import Sequence as Seq

        with torch.inference_mode():
            for size in self.buckets:
                seqs = [Seq(None, 1, slot=i, computed=1) for i in range(size)]  # slots 0..size-1, as real steps
                rows = {id(s): RowState([0], (), _PLAIN, False) for s in seqs}
                self.execute(StepPlan(decode=seqs), rows, None)
        if wait:
            self.wait_compiled()


class _PlainLayout:
    prefix_len = 0
    recompute = 0

    @staticmethod
    def positions(start: int, count: int) -> list[int]:
        return list(range(start, start + count))


_PLAIN = _PlainLayout()
