"""The scheduler: the waiting queue, admission into KV slots, and which tokens each step runs.

Pure bookkeeping, no torch and no model: every step it admits waiting sequences while a KV
slot is free, gives each running sequence whose prompt is done one decode token, and fills
the rest of the step's token budget with prompt chunks (chunked prefill), oldest first. So a
new arrival never stalls the running requests for more than one budget's worth of tokens,
and a long prompt is spread over several steps while decoding goes on.

With `separate_prefill` (the engine sets it when decode-only steps run compiled), prompt
chunks and decode tokens go to alternating steps instead of one mixed step: a mixed step runs
eager, so an arrival's first token came after a whole eager forward of both parts, while a
prefill-only step returns it after the prompt alone, and the decoding rows lose the same time
either way (an eager mixed step costs about a compiled decode step plus the chunk).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .errors import CapacityExceeded

MIN_CHUNK = 16  # prompt tokens a step prefills at least, however many rows decode


@dataclass(eq=False)
class Sequence:
    """One request as the scheduler sees it."""

    payload: object  # the engine's per-request state
    prompt_len: int  # tokens to prefill: soft-prompt placeholders + prompt
    whole_prompt: bool = False  # never split the prompt (gated adapters average over a forward's tokens)
    slot: int = -1
    computed: int = 0  # tokens already in the cache (prefix entries not counted)
    finished: bool = False
    # choices of one prompt (n / best_of): a follower prefills nothing while its leader's prompt
    # runs; then, if it holds a slot, the engine copies the leader's KV entries into it
    leader: "Sequence | None" = None
    followers: list["Sequence"] = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.computed < self.prompt_len


@dataclass(frozen=True)
class Chunk:
    seq: Sequence
    start: int  # first token index (of the sequence's tokens) in this chunk
    count: int

    @property
    def completes_prompt(self) -> bool:
        return self.start + self.count >= self.seq.prompt_len


@dataclass(frozen=True)
class StepPlan:
    decode: list[Sequence] = field(default_factory=list)  # one new token each, in slot order
    prefill: list[Chunk] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)  # got their slot in this step

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(c.count for c in self.prefill)


class Scheduler:
    def __init__(self, num_slots: int, token_budget: int = 512, max_queue: int = 256,
                 separate_prefill: bool = False):
        self.num_slots = num_slots
        self.token_budget = token_budget
        self.max_queue = max_queue
        self.separate_prefill = separate_prefill
        self._last_prefilled = False  # the previous step ran prompt chunks (separate_prefill alternates)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self._free = list(range(num_slots))  # heap: always the lowest free slot

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def enqueue(self, *seqs: Sequence) -> None:
        """Queue all of `seqs`, or none of them when the queue has no room for all."""
        if len(self.waiting) + len(seqs) > self.max_queue:
            raise CapacityExceeded(
                f"the request queue is full ({self.max_queue} waiting, {self.num_slots} running); retry later")
        self.waiting.extend(seqs)

    def drop_waiting(self, predicate: Callable[[Sequence], bool]) -> list[Sequence]:
        """Remove and return the waiting sequences for which predicate holds."""
        dropped = [s for s in self.waiting if predicate(s)]
        if dropped:
            self.waiting = deque(s for s in self.waiting if not predicate(s))
            for seq in dropped:
                self.release_followers(seq)
        return dropped

    def take_waiting(self) -> list[Sequence]:
        taken, self.waiting = list(self.waiting), deque()
        return taken

    def schedule(self) -> StepPlan:
        admitted = []
        while self.waiting and self._free:
            seq = self.waiting.popleft()
            seq.slot = heapq.heappop(self._free)
            self.running.append(seq)
            admitted.append(seq)
        decode = sorted((s for s in self.running if not s.prefilling), key=lambda s: s.slot)
        if self.separate_prefill and decode:
            if self._last_prefilled or not self._has_prefill():
                self._last_prefilled = False
                return StepPlan(decode, [], admitted)  # the decoding rows' turn
            decode = []  # a prompt chunk waits: this step is prefill-only
        budget = max(self.token_budget - len(decode), MIN_CHUNK)
        prefill = []
        for seq in self.running:
            if not seq.prefilling or budget <= 0 or seq.leader is not None:
                continue
            left = seq.prompt_len - seq.computed
            if seq.whole_prompt and left > budget and prefill:
                continue  # waits for a step where it can run whole (it runs alone if it must)
            count = left if seq.whole_prompt else min(left, budget)
            prefill.append(Chunk(seq, seq.computed, count))
            budget -= count
        self._last_prefilled = bool(prefill)
        return StepPlan(decode, prefill, admitted)

    def _has_prefill(self) -> bool:
        return any(s.prefilling and s.leader is None for s in self.running)

    def advance(self, plan: StepPlan) -> None:
        """The plan's tokens are now in the cache."""
        for seq in plan.decode:
            seq.computed += 1
        for chunk in plan.prefill:
            chunk.seq.computed += chunk.count

    def finish(self, seq: Sequence) -> None:
        """The sequence leaves: its slot is free for the next admission."""
        if seq in self.running:
            self.running.remove(seq)
            heapq.heappush(self._free, seq.slot)
        seq.finished = True
        self.release_followers(seq)  # a leader that ends early: its followers prefill themselves

    def release_followers(self, leader: Sequence) -> list[Sequence]:
        """The leader's prompt is in the cache (or the leader is gone): its followers stop
        waiting. Those that hold a slot and computed nothing yet are returned with their prompt
        counted as computed: the caller copies the leader's KV entries into their slots. The
        others prefill their prompt themselves when their turn comes."""
        followers, leader.followers = leader.followers, []
        forked = []
        for f in followers:
            f.leader = None
            if not leader.finished and not f.finished and f.slot >= 0 and f.computed == 0 and f in self.running:
                f.computed = f.prompt_len
                forked.append(f)
        return forked

    def finish_all(self) -> Iterable[Sequence]:
        for seq in list(self.running):
            self.finish(seq)
            yield seq
