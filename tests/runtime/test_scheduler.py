"""The scheduler alone (no model): admission into the lowest free slots, the queue limit, and
chunked prefill under a token budget, against what a plain simulation of the rules expects."""

from __future__ import annotations

import pytest

from adapter_runtime.errors import CapacityExceeded
from adapter_runtime.scheduler import MIN_CHUNK, Scheduler, Sequence


def run_step(s: Scheduler):
    plan = s.schedule()
    s.advance(plan)
    return plan


def test_admission_takes_the_lowest_free_slot_and_the_queue_is_bounded():
    s = Scheduler(num_slots=3, token_budget=100, max_queue=2)
    a, b = Sequence("a", 4), Sequence("b", 4)
    s.enqueue(a)
    s.enqueue(b)
    with pytest.raises(CapacityExceeded):
        s.enqueue(Sequence("c", 4))
    plan = run_step(s)
    assert [x.slot for x in plan.admitted] == [0, 1] and s.free_slots == 1
    s.finish(a)
    s.enqueue(Sequence("d", 4))
    s.enqueue(Sequence("e", 4))
    plan = run_step(s)
    assert [x.slot for x in plan.admitted] == [0, 2] and s.free_slots == 0  # a's slot 0 comes back first
    assert [x.payload for x in s.waiting] == [] and len(s.running) == 3


def test_an_arrival_is_prefilled_in_chunks_while_the_others_decode():
    budget = 64
    s = Scheduler(num_slots=32, token_budget=budget)
    decoders = [Sequence(i, 8) for i in range(31)]
    for d in decoders:
        s.enqueue(d)
    run_step(s)  # 31 x 8 prompt tokens: more than one budget, spread over steps
    while any(d.prefilling for d in decoders):
        run_step(s)
    arrival = Sequence("new", 100)
    s.enqueue(arrival)
    covered = 0
    steps = 0
    while arrival.prefilling:
        before = [d.computed for d in decoders]
        plan = run_step(s)
        steps += 1
        assert [d.computed for d in decoders] == [x + 1 for x in before], "every decoder gets its token each step"
        chunk = plan.prefill[0]
        assert chunk.seq is arrival and chunk.start == covered
        assert chunk.count == min(100 - covered, max(budget - 31, MIN_CHUNK))
        covered += chunk.count
    assert covered == 100 and steps == 4  # 33 + 33 + 33 + 1
    assert s.schedule().decode[-1] is arrival  # then it decodes with the others, in slot order


def test_a_whole_prompt_sequence_is_never_split():
    s = Scheduler(num_slots=4, token_budget=32)
    small, whole = Sequence("small", 10), Sequence("whole", 50, whole_prompt=True)
    s.enqueue(small)
    s.enqueue(whole)
    plan = run_step(s)
    assert [(c.seq.payload, c.count) for c in plan.prefill] == [("small", 10)]  # whole waits: it does not fit
    plan = run_step(s)
    assert [(c.seq.payload, c.start, c.count) for c in plan.prefill] == [("whole", 0, 50)]  # alone, over budget


def test_separate_prefill_gives_an_arrival_its_own_step_and_alternates_with_decoding():
    """With a compiled decode step (separate_prefill), an arrival's first chunk runs in the very
    next step, alone; while a long prompt is chunked, prefill and decode steps alternate, so the
    decoding rows get a token every second step at worst and every row finishes."""
    s = Scheduler(num_slots=8, token_budget=32, separate_prefill=True)
    decoders = [Sequence(i, 4) for i in range(3)]
    s.enqueue(*decoders)
    first = run_step(s)
    assert first.prefill and not first.decode  # nothing decodes yet: the prompts run together
    assert [run_step(s).decode for _ in range(2)] == [decoders, decoders]  # no prompt left: decode only
    arrival = Sequence("long", 100)  # 100 tokens at a budget of 32: four chunks
    s.enqueue(arrival)
    kinds = []
    while arrival.prefilling:
        plan = run_step(s)
        assert not (plan.decode and plan.prefill)
        kinds.append("prefill" if plan.prefill else "decode")
    assert kinds == ["prefill", "decode", "prefill", "decode", "prefill", "decode", "prefill"]
    assert run_step(s).decode == [*decoders, arrival]
    # without the flag the same arrival shares its steps with the decoding rows
    mixed = Scheduler(num_slots=8, token_budget=32)
    mixed.enqueue(*[Sequence(i, 4) for i in range(3)])
    run_step(mixed)
    mixed.enqueue(Sequence("long", 100))
    plan = run_step(mixed)
    assert len(plan.decode) == 3 and plan.prefill[0].count == 32 - 3
