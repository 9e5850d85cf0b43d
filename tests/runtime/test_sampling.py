"""Penalties, logit_bias and min_tokens, applied per row inside the batched step, against a
plain per-row reference loop over the vocabulary; then in the engine, mixed with plain rows
and adapter rows, against a reference generation loop over transformers / PEFT."""

from __future__ import annotations

import math

import pytest
import torch

from adapter_runtime.engine import Engine, EngineConfig, Request
from adapter_runtime.errors import InvalidRequest
from adapter_runtime.models import load_model
from adapter_runtime.sampling import SamplingParams, SamplingState, check, choose, process_logits
from tests.support.oracles import peft_adapter, reference_generate, reference_logits
from tests.support.tiny import VOCAB, hf_model, random_ids, save_checkpoint

V = 40
EOS = (39,)
TIMEOUT = 60


ROWS = [  # (params, prompt, output so far)
    (SamplingParams(temperature=0.0), [1, 2], [3, 3]),
    (SamplingParams(temperature=0.0, repetition_penalty=1.7), [1, 2, 5], [5, 7, 7]),
    (SamplingParams(temperature=0.0, frequency_penalty=0.8, presence_penalty=-0.4), [4], [9, 9, 9, 2]),
    (SamplingParams(temperature=0.0, logit_bias=((0, 5.0), (11, -100.0))), [8], [1]),
    (SamplingParams(temperature=0.0, min_tokens=5, stop_token_ids=(12,)), [6], [1, 2]),
    (SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True, stop_token_ids=(13,)), [6], [1]),
    (SamplingParams(temperature=0.0, min_tokens=1), [6], [1, 2]),  # past min_tokens: nothing held back
    (SamplingParams(temperature=0.0, repetition_penalty=0.6, frequency_penalty=1.5, presence_penalty=2.0,
                    logit_bias=((3, 2.5),), min_tokens=9), [3, 30, 31], [30, 30, 17]),
]


def state_after(params: SamplingParams, prompt: list[int], output: list[int]) -> SamplingState:
    """A state that has generated `output`, driven through `choose` with logits that make each
    token the only choice."""
    state = SamplingState(params, prompt, V, EOS, torch.device("cpu"))
    for token in output:
        forced = torch.full((1, V), -1e4)
        forced[0, token] = 1e4
        assert choose(forced, [state]) == [token]
    return state


def test_process_logits_equals_a_plain_loop_and_each_row_alone():
    logits = torch.randn(len(ROWS), V, generator=torch.Generator().manual_seed(0)) * 3
    states = [state_after(*row) for row in ROWS]
    batched = process_logits(logits, states)
    for b, (params, prompt, output) in enumerate(ROWS):
        want = torch.tensor(reference_logits(logits[b].tolist(), prompt, output, params, EOS))
        assert torch.allclose(batched[b], want, atol=1e-5), b
        alone = process_logits(logits[b : b + 1], [state_after(params, prompt, output)])[0]
        assert torch.equal(alone, batched[b]), b
    assert torch.equal(batched[0], logits[0])  # a row without processors is untouched
    assert batched[4, 39] == batched[4, 12] == -math.inf and batched[5, 13] == -math.inf and batched[5, 39] > -1e9
    assert batched[6, 39] == logits[6, 39]


def test_choose_keeps_counts_and_the_cumulative_logprob():
    g = torch.Generator().manual_seed(1)
    params = [SamplingParams(temperature=0.0, frequency_penalty=0.5), SamplingParams(temperature=0.7, seed=3),
              SamplingParams(temperature=0.0, repetition_penalty=1.1)]
    states = [SamplingState(p, [1], V, EOS, torch.device("cpu")) for p in params]
    chosen: list[list[int]] = [[], [], []]
    logprob_sums = [0.0, 0.0, 0.0]
    for _ in range(6):
        logits = torch.randn(3, V, generator=g)
        for b, t in enumerate(choose(logits, states)):
            chosen[b].append(t)
            logprob_sums[b] += torch.log_softmax(logits[b], -1)[t].item()
    for b, s in enumerate(states):
        assert s.generated == 6 and abs(s.cumulative_logprob - logprob_sums[b]) < 1e-4
    assert states[0].output_counts.tolist() == [float(chosen[0].count(v)) for v in range(V)]
    assert states[1].output_counts is None and states[2].output_counts is None and states[0].seen is None
    assert states[2].seen.nonzero().flatten().tolist() == sorted({1, *chosen[2]})


def test_check_names_the_field():
    for params, field in [(SamplingParams(presence_penalty=2.5), "presence_penalty"),
                          (SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
                          (SamplingParams(max_tokens=4, min_tokens=5), "min_tokens"),
                          (SamplingParams(logit_bias=((V, 1.0),)), "logit_bias"),
                          (SamplingParams(logit_bias=((1, 101.0),)), "logit_bias"),
                          # NaN passed `< 0` style checks and sampled NaN logits (the engine API has no JSON layer)
                          (SamplingParams(temperature=math.nan), "temperature"),
                          (SamplingParams(temperature=math.inf), "temperature"),
                          (SamplingParams(repetition_penalty=math.inf), "repetition_penalty")]:
        with pytest.raises(InvalidRequest, match=field):
            check(params, V)


# ---------------------------------------------------------------------- in the engine
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(engine, HF base, PEFT model, our adapter) for the tiny Llama and a randomized LoRA."""
    from peft import LoraConfig

    from adapter_runtime.formats import load_adapter

    tmp = tmp_path_factory.mktemp("sampling")
    hf = hf_model("llama")
    loaded = load_model(save_checkpoint(hf, tmp / "base"))
    lora_dir, peft_model = peft_adapter("llama", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                                        tmp / "lora")
    adapter = load_adapter(lora_dir, loaded.info, "lora")
    with Engine(loaded, config=EngineConfig(max_batch=8, max_seq_len=64)) as engine:
        yield engine, hf, peft_model.eval(), adapter


def test_mixed_rows_equal_the_reference_loop(served):
    """Penalized, biased, min_tokens and plain rows, on the base and on a LoRA, in one batch."""
    engine, hf, peft_model, adapter = served
    eos = engine.loaded.eos_token_ids
    greedy = dict(max_tokens=10, temperature=0.0)
    cases = [
        (SamplingParams(**greedy, ignore_eos=True), ()),
        (SamplingParams(**greedy, ignore_eos=True, repetition_penalty=1.8), ()),
        (SamplingParams(**greedy, ignore_eos=True, frequency_penalty=1.2, presence_penalty=0.7), (adapter,)),
        (SamplingParams(**greedy, ignore_eos=True), (adapter,)),
        (SamplingParams(**greedy, logit_bias=((eos[0], 100.0), (7, 3.0)), min_tokens=3), ()),  # eos as soon as allowed
        (SamplingParams(**greedy, ignore_eos=True, repetition_penalty=0.7, logit_bias=((11, 4.0),),
                        frequency_penalty=-0.5), (adapter,)),
    ]
    prompts = [random_ids(1, n, seed=40 + i)[0].tolist() for i, n in enumerate([5, 9, 4, 7, 6, 8])]
    handles = [engine.submit(Request(tuple(p), params, setup)) for p, (params, setup) in zip(prompts, cases)]
    results = [h.result(TIMEOUT) for h in handles]
    plain = reference_generate(hf, prompts[0], cases[0][0], eos)
    assert reference_generate(hf, prompts[0], cases[1][0], eos) != plain  # the penalty changes the output
    for prompt, (params, setup), got in zip(prompts, cases, results):
        model = peft_model if setup else hf
        assert list(got.token_ids) == reference_generate(model, prompt, params, eos)
    assert list(results[4].token_ids) == [*results[4].token_ids[:3], eos[0]] and results[4].finish_reason == "stop"
    # each row alone gives what it gave in the mixed batch
    for prompt, (params, setup), got in zip(prompts, cases, results):
        assert engine.submit(Request(tuple(prompt), params, setup)).result(TIMEOUT).token_ids == got.token_ids


def test_seeded_penalized_sampling_ignores_batch_mates(served):
    engine, _, _, adapter = served
    params = SamplingParams(max_tokens=12, temperature=0.9, seed=77, ignore_eos=True, frequency_penalty=0.6,
                            logit_bias=((5, 2.0),))
    prompt = tuple(random_ids(1, 6, seed=50)[0].tolist())
    alone = engine.submit(Request(prompt, params, (adapter,))).result(TIMEOUT).token_ids
    mates = [engine.submit(Request(tuple(random_ids(1, 4, seed=60 + i)[0].tolist()),
                                   SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True,
                                                  repetition_penalty=1.3), (adapter,) if i % 2 else ()))
             for i in range(4)]
    crowded = engine.submit(Request(prompt, params, (adapter,))).result(TIMEOUT).token_ids
    assert crowded == alone
    for m in mates:
        m.result(TIMEOUT)


def test_the_engine_reports_the_cumulative_logprob(served):
    engine, hf, _, _ = served
    prompt = random_ids(1, 5, seed=70)[0].tolist()
    c = engine.submit(Request(tuple(prompt), SamplingParams(max_tokens=6, temperature=1.0, seed=4, ignore_eos=True,
                                                            presence_penalty=1.0))).result(TIMEOUT)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + list(c.token_ids)])).logits[0].float(), -1)
    want = sum(ref[len(prompt) - 1 + i, t].item() for i, t in enumerate(c.token_ids))
    assert abs(c.cumulative_logprob - want) < 1e-3


def test_logit_bias_out_of_vocabulary_is_refused(served):
    engine = served[0]
    with pytest.raises(InvalidRequest, match="logit_bias token id"):
        engine.submit(Request((1, 2), SamplingParams(logit_bias=((VOCAB, 1.0),))))


def test_greedy_picks_the_first_of_tied_maxima_and_flags_rows_that_are_not_finite():
    """The batched greedy path (one max pass) against a plain loop over each row: the first index
    of the largest logit, its log-probability; NaN or +inf rows come back as None."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randint(-3, 4, (6, V), generator=g).float()  # few distinct values: ties everywhere
    logits[4, 7] = float("nan")
    logits[5, 9] = float("inf")
    states = [SamplingState(SamplingParams(temperature=0.0), [1], V, EOS, torch.device("cpu")) for _ in range(6)]
    tokens = choose(logits, states)
    for b in range(4):
        row = logits[b].tolist()
        first_max = row.index(max(row))
        assert tokens[b] == first_max
        assert abs(states[b].cumulative_logprob - (row[first_max] - math.log(sum(math.exp(v) for v in row)))) < 1e-5
    assert tokens[4:] == [None, None]


def test_a_row_left_without_a_finite_logit_by_its_penalties_fails_alone():
    """A repetition_penalty of 1e38 on a row whose every token was seen turns all its (negative)
    logits into -inf: sampling it raised inside the step and failed the whole batch; greedy
    returned token 0 as if it were a choice."""
    logits = -torch.rand(2, V) - 4.0  # every logit below -4: times the penalty, below the float32 range
    for temperature in (1.0, 0.0):  # greedy took index 0 of a row of -inf
        hostile = SamplingState(SamplingParams(temperature=temperature, repetition_penalty=1e38, seed=1),
                                list(range(V)), V, EOS, torch.device("cpu"))
        fine = SamplingState(SamplingParams(temperature=temperature, seed=2), [1], V, EOS, torch.device("cpu"))
        tokens = choose(logits, [hostile, fine])
        assert tokens[0] is None and 0 <= tokens[1] < V, temperature
