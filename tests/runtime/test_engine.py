"""The engine's scheduler, sampling and stop conditions against transformers (never against
its own output): greedy equals `generate`, decode logits equal a full forward."""

from __future__ import annotations

import itertools

import pytest
import torch

from adapter_runtime.adapters import Adapter, LoRA, Prefix, Prompt
from adapter_runtime.engine import Engine, EngineConfig, Request
from adapter_runtime.errors import AdapterRuntimeError, CapacityExceeded, EngineUnavailable, InvalidRequest, NumericOverflow
from tests.support.packed import forward_sequences
from adapter_runtime.models import load_model
from adapter_runtime.sampling import Detokenizer, SamplingParams, filter_logits
from tests.support.tiny import hf_model, random_ids, save_checkpoint

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
TIMEOUT = 60


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request, tmp_path_factory):
    hf = hf_model(request.param)
    hf.generation_config.eos_token_id = None  # generate exactly max_new_tokens, like ignore_eos
    hf.generation_config.pad_token_id = 0
    return hf, load_model(save_checkpoint(hf, tmp_path_factory.mktemp(request.param)))


@pytest.fixture(scope="module")
def engine(pair):
    with Engine(pair[1], config=EngineConfig(max_batch=4, max_seq_len=96)) as eng:
        yield eng


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] log-probabilities of the next token after each position."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)


def prompts(lengths, seed=0) -> list[list[int]]:
    return [random_ids(1, n, seed=seed + i)[0].tolist() for i, n in enumerate(lengths)]


def test_greedy_batch_equals_transformers_generate(pair, engine):
    hf, _ = pair
    rows = prompts([5, 11, 3, 8, 14, 6])  # more requests than slots: some wait for a slot
    handles = [engine.submit(Request(tuple(p), GREEDY)) for p in rows]
    for p, h in zip(rows, handles):
        c = h.result(TIMEOUT)
        assert list(c.token_ids) == hf_greedy(hf, p, 10)
        assert (c.finish_reason, c.prompt_tokens, c.completion_tokens) == ("length", len(p), 10)
    assert engine.stats()["free_slots"] == 4


def test_staggered_requests_equal_each_alone(pair, engine):
    hf, _ = pair
    rows = prompts([9, 4, 12], seed=10)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (14, 6, 9)]
    first = engine.submit(Request(tuple(rows[0]), params[0]))
    events = first.events(TIMEOUT)
    got = [next(events).token_ids for _ in range(3)]  # the first is decoding when the others join
    second = engine.submit(Request(tuple(rows[1]), params[1]))
    got += [next(events).token_ids for _ in range(2)]
    third = engine.submit(Request(tuple(rows[2]), params[2]))
    got += [e.token_ids for e in events]
    assert list(itertools.chain(*got)) == hf_greedy(hf, rows[0], 14)
    assert list(second.result(TIMEOUT).token_ids) == hf_greedy(hf, rows[1], 6)
    assert list(third.result(TIMEOUT).token_ids) == hf_greedy(hf, rows[2], 9)


def test_decode_logprobs_equal_a_full_transformers_forward(pair, engine):
    hf, _ = pair
    rows = prompts([7, 13, 4], seed=20)
    params = SamplingParams(max_tokens=8, temperature=0.9, top_k=40, seed=3, logprobs=3, ignore_eos=True)
    handles = [engine.submit(Request(tuple(p), params)) for p in rows]
    for p, h in zip(rows, handles):
        c = h.result(TIMEOUT)
        ref = hf_logprobs(hf, p + list(c.token_ids))
        for i, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            assert abs(entry.logprob - ref[len(p) - 1 + i, token].item()) < 1e-4
            assert abs(max(entry.top.values()) - ref[len(p) - 1 + i].max().item()) < 1e-4


def test_seeded_sampling_ignores_batch_mates(engine):
    p = tuple(prompts([6], seed=30)[0])
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = engine.submit(Request(p, params)).result(TIMEOUT).token_ids
    mates = [engine.submit(Request(tuple(q), SamplingParams(max_tokens=n, temperature=1.0, ignore_eos=True)))
             for q, n in zip(prompts([3, 9, 12], seed=40), (4, 12, 7))]
    crowded = engine.submit(Request(p, params)).result(TIMEOUT).token_ids
    other_seed = engine.submit(Request(p, SamplingParams(**{**params.__dict__, "seed": 99}))).result(TIMEOUT).token_ids
    assert crowded == alone and other_seed != alone
    for m in mates:
        m.result(TIMEOUT)


def test_stop_strings_and_stop_token_ids(pair, engine):
    hf, loaded = pair
    prompt = prompts([6], seed=50)[0]
    ref = hf_greedy(hf, prompt, 20)
    tok = loaded.tokenizer
    full = tok.decode(ref, skip_special_tokens=True)
    at = next(i for i in range(3, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    stop = full[at : at + 2]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=("\x00never", stop))
    h = engine.submit(Request(tuple(prompt), params))
    events = list(h.events(TIMEOUT))
    assert "".join(e.text for e in events) == full[: full.index(stop)]
    assert events[-1].finish_reason == "stop"
    assert all(stop not in e.text for e in events)  # the held-back tail never leaks the stop string

    k = 4
    c = engine.submit(Request(tuple(prompt), SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=(ref[k],)))).result(TIMEOUT)
    k = ref.index(ref[k])
    assert list(c.token_ids) == ref[: k + 1] and c.finish_reason == "stop"
    assert c.text == tok.decode(ref[:k], skip_special_tokens=True)


def test_echo_scores_the_prompt_with_max_tokens_zero(pair, engine):
    hf, _ = pair
    prompt = prompts([10], seed=60)[0]
    c = engine.submit(Request(tuple(prompt), SamplingParams(max_tokens=0, echo=True, logprobs=1))).result(TIMEOUT)
    ref = hf_logprobs(hf, prompt)
    assert c.logprobs[0].logprob is None and c.completion_tokens == 0 and c.finish_reason == "length"
    got = torch.tensor([e.logprob for e in c.logprobs[1:]])
    want = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    assert torch.allclose(got, want, atol=1e-4)


def test_cancel_frees_the_slot(pair):
    with Engine(pair[1], config=EngineConfig(max_batch=1, max_seq_len=96)) as eng:
        long = eng.submit(Request((1, 2, 3), SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)))
        events = long.events(TIMEOUT)
        next(events)
        long.cancel()
        rest = list(events)
        assert rest[-1].finish_reason == "cancelled" and len(rest) < 79
        c = eng.submit(Request((4, 5), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))).result(TIMEOUT)
        assert c.completion_tokens == 3 and eng.stats()["free_slots"] == 1


def test_queue_limits_and_shutdown(pair):
    eng = Engine(pair[1], config=EngineConfig(max_batch=1, max_queue=2, max_seq_len=32))
    p = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    first, second = (eng.submit(Request((1, 2), p)) for _ in range(2))  # not started: both wait
    with pytest.raises(CapacityExceeded, match="queue is full"):
        eng.submit(Request((1, 2), p))
    with pytest.raises(InvalidRequest, match="maximum context length 32"):
        eng.submit(Request(tuple(range(30)), SamplingParams(max_tokens=5)))
    eng.start()
    assert first.result(TIMEOUT).completion_tokens == second.result(TIMEOUT).completion_tokens == 2
    eng.stop()
    with pytest.raises(EngineUnavailable):
        eng.submit(Request((1, 2), p))


def test_a_failing_request_does_not_stop_the_loop(pair, engine):
    hf, loaded = pair
    module, (n_in, n_out) = next(iter(loaded.info.linear_shapes.items()))
    bad = Adapter("bad", "peft", "lora", {}, linear={(0, module): LoRA(torch.ones(2, n_in + 1), torch.ones(n_out, 2), 1.0)})
    failing = engine.submit(Request((1, 2, 3), GREEDY, setup=(bad,)))
    with pytest.raises(AdapterRuntimeError, match="internal error"):
        failing.result(TIMEOUT)
    assert list(engine.submit(Request((1, 2, 3), GREEDY)).result(TIMEOUT).token_ids) == hf_greedy(hf, [1, 2, 3], 10)


def token_space_adapter(info, seed: int) -> Adapter:
    """Random prompt tuning (2 virtual tokens) + a position-shifting prefix (3 entries) + a LoRA
    on layer 1: every layout feature of a row at once."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    module, (n_in, n_out) = next(iter(info.linear_shapes.items()))
    kv = lambda: {layer: rand(info.num_kv_heads, 3, info.head_dim) for layer in range(info.num_layers)}  # noqa: E731
    return Adapter("mix", "peft", "mixed", {}, linear={(1, module): LoRA(rand(4, n_in), rand(n_out, 4), 2.0)},
                   prefix=Prefix(kv(), kv(), 3, shifts_positions=True), prompt=Prompt(rand(2, info.hidden_size)))


def test_adapter_rows_decode_like_the_one_shot_forward(pair, engine):
    """Prompt tuning + a position-shifting prefix + LoRA: the engine's incremental layout
    (slots, positions, virtual tokens) against the one-shot packed forward over the whole text."""
    _, loaded = pair
    adapter = token_space_adapter(loaded.info, seed=7)
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=0, ignore_eos=True)
    rows = prompts([5, 8], seed=70)
    handles = [engine.submit(Request(tuple(rows[0]), params, setup=(adapter,))),
               engine.submit(Request(tuple(rows[1]), params))]
    for p, setup, h in zip(rows, [(adapter,), ()], handles):
        c = h.result(TIMEOUT)
        ref = torch.log_softmax(forward_sequences(loaded.model, [p + list(c.token_ids)], [setup])[0].float(), -1)
        want = ref[torch.arange(len(p) - 1, len(p) - 1 + 6), torch.tensor(c.token_ids)]
        assert torch.allclose(torch.tensor([e.logprob for e in c.logprobs]), want, atol=1e-4)
        assert list(c.token_ids) == ref[len(p) - 1 : -1].argmax(-1).tolist()


def test_filter_logits_against_a_plain_loop():
    logits = torch.tensor([2.0, 0.5, 1.0, -1.0, 3.0, 0.0])
    probs = logits.softmax(-1).tolist()
    order = sorted(range(6), key=lambda i: -probs[i])
    keep, mass = set(), 0.0
    for i in order:  # nucleus: smallest set of most likely tokens with mass >= top_p
        keep.add(i)
        mass += probs[i]
        if mass >= 0.8:
            break
    assert set(torch.isfinite(filter_logits(logits, 0, 0.8)).nonzero().flatten().tolist()) == keep
    assert set(torch.isfinite(filter_logits(logits, 3, 1.0)).nonzero().flatten().tolist()) == set(order[:3])


def test_detokenizer_never_splits_a_character(pair):
    tok = pair[1].tokenizer
    text = "héllo → wörld ✓ 日本"
    ids = tok(text)["input_ids"]
    d = Detokenizer(tok)
    deltas = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(deltas) == text and not any("\ufffd" in s for s in deltas)


def test_choices_of_one_prompt_share_its_prefill(pair):
    """n / best_of: `submit_group` prefills the prompt once (prefix entries and soft-prompt
    tokens included) and the other choices copy its KV entries; every choice still samples with
    its own seed, gives what it gives alone, and its log-probabilities equal a full forward."""
    _, loaded = pair
    adapter = token_space_adapter(loaded.info, seed=11)
    prompt = tuple(prompts([9], seed=80)[0])
    with Engine(loaded, config=EngineConfig(max_batch=4, max_seq_len=64, compile=False)) as engine:
        prefilled = []
        execute = engine.runner.execute
        engine.runner.execute = lambda plan, *a: prefilled.append(sum(c.count for c in plan.prefill)) or execute(plan, *a)
        for setup in [(), (adapter,)]:
            choices = [Request(prompt, SamplingParams(max_tokens=6, temperature=1.0, seed=s, logprobs=0, ignore_eos=True),
                               setup) for s in (1, 2, 3)]
            prefilled.clear()
            together = [h.result(TIMEOUT) for h in engine.submit_group(choices)]
            assert sum(prefilled) == len(prompt) + 2 * bool(setup)  # one prompt (+ its 2 virtual tokens)
            alone = [engine.submit(r).result(TIMEOUT) for r in choices]
            assert [c.token_ids for c in together] == [c.token_ids for c in alone]
            assert len({c.token_ids for c in together}) > 1  # the seeds differ, so do the choices
            for c in together:
                ref = torch.log_softmax(forward_sequences(loaded.model, [list(prompt) + list(c.token_ids)], [setup])[0]
                                        .float(), -1)
                want = ref[torch.arange(len(prompt) - 1, len(prompt) + 5), torch.tensor(c.token_ids)]
                assert torch.allclose(torch.tensor([e.logprob for e in c.logprobs]), want, atol=1e-4)


def test_a_group_whose_leader_is_cancelled_still_answers(pair):
    _, loaded = pair
    prompt = tuple(prompts([40], seed=81)[0])
    params = [SamplingParams(max_tokens=4, temperature=1.0, seed=s, ignore_eos=True) for s in (5, 6)]
    with Engine(loaded, config=EngineConfig(max_batch=1, max_seq_len=64, compile=False, token_budget=16)) as engine:
        blocker = engine.submit(Request(tuple(prompts([8], seed=82)[0]), SamplingParams(max_tokens=20, ignore_eos=True)))
        leader, follower = engine.submit_group([Request(prompt, p) for p in params])
        leader.cancel()  # while it waits for the one slot
        blocker.result(TIMEOUT)
        got = follower.result(TIMEOUT).token_ids
        assert got == engine.submit(Request(prompt, params[1])).result(TIMEOUT).token_ids


def test_a_decode_step_reuses_its_adapter_step_only_while_its_rows_and_bank_slots_stay(pair):
    from adapter_runtime.models.common import KVCache
    from adapter_runtime.runner import _PLAIN, ModelRunner, RowState
    from adapter_runtime.scheduler import Sequence, StepPlan

    _, loaded = pair
    info = loaded.info
    runner = ModelRunner(loaded.model, KVCache(info, 4, 16, torch.float32, torch.device("cpu")), bank_capacity=3)
    module, (n_in, n_out) = next(iter(info.linear_shapes.items()))
    a, b = (Adapter(n, "peft", "lora", {}, linear={(0, module): LoRA(torch.randn(2, n_in), torch.randn(n_out, 2), 1.0)})
            for n in "ab")
    seqs = [Sequence(None, 1, slot=i, computed=1) for i in range(2)]
    rows = {id(s): RowState([0], (x,), _PLAIN, False) for s, x in zip(seqs, (a, b))}

    def step():
        runner.execute(StepPlan(decode=seqs), rows, None)
        return runner._last_step.adapters

    first = step()
    assert step() is first  # same rows, same slots: reused
    runner.banks.drop(a)  # a leaves the banks; the next step writes it again
    runner.banks.slot(Adapter("c", "peft", "lora", {}, linear=dict(b.linear)))  # and c takes a slot first
    rebuilt = step()
    assert rebuilt is not first
    slots = rebuilt.slots[("lora", None)].tolist()
    assert slots == [runner.banks.peek(a), runner.banks.peek(b)] != first.slots[("lora", None)].tolist()
    rows[id(seqs[1])] = RowState([0], (), _PLAIN, False)  # a row's setup changes: built anew
    assert step() is not rebuilt


def overflowing_lora(info) -> Adapter:
    """Finite weights (uploads refuse NaN and infinity) whose delta overflows fp32 to inf/NaN."""
    module, (n_in, n_out) = next(iter(info.linear_shapes.items()))
    return Adapter("overflow", "peft", "lora", {}, linear={(0, module): LoRA(torch.full((2, n_in), 1e30),
                                                                              torch.full((n_out, 2), 1e30), 1.0)})


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_an_adapter_that_overflows_fails_its_request_alone_with_a_clear_error(pair, engine, temperature):
    """Its logits are NaN: greedy took the NaN's index as a token (a silent wrong output) and
    sampling raised inside the step, failing every request in the batch with an internal error."""
    hf, loaded = pair
    params = SamplingParams(max_tokens=10, temperature=temperature, seed=1, ignore_eos=True)
    bad = engine.submit(Request((1, 2, 3), params, setup=(overflowing_lora(loaded.info),)))
    good = engine.submit(Request((4, 5, 6), GREEDY))
    with pytest.raises(NumericOverflow, match="not finite.*adapter 'overflow' overflows"):
        bad.result(TIMEOUT)
    assert list(good.result(TIMEOUT).token_ids) == hf_greedy(hf, [4, 5, 6], 10)
