"""Our model families against transformers on tiny random checkpoints (fp32, eager)."""

import pytest
import torch

from adapter_runtime.batch import ForwardBatch
from tests.support.packed import forward_sequences
from adapter_runtime.models import KVCache, load_model
from tests.support.tiny import hf_model, random_ids, save_checkpoint

FAMILIES = {
    "gpt2": {},
    "llama": {},
    "llama-rope-llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    "llama-rope-yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                        "rope_theta": 500.0},
    "llama-rope-linear": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "llama-rope-dynamic": {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 8},
    "llama-tied": {"tie_word_embeddings": True},
    "mistral": {"sliding_window": 6},
    "qwen2": {},
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    kind = request.param.split("-")[0]
    hf = hf_model(kind, **FAMILIES[request.param])
    ours = load_model(save_checkpoint(hf, tmp_path_factory.mktemp(request.param)))
    return hf, ours


def test_logits_match_transformers_batched_and_padded(pair):
    hf, ours = pair
    ids = random_ids(3, 12)
    lengths = [12, 7, 10]
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
    out = forward_sequences(ours.model, [ids[b, :n].tolist() for b, n in enumerate(lengths)])
    for b, n in enumerate(lengths):
        assert (out[b] - ref[b, :n]).abs().max().item() <= 1e-4


def test_incremental_decoding_equals_full_forward(pair):
    """Prefill 5 tokens, then feed one token per step through the KV cache: every step's
    logits equal transformers' full forward at that position."""
    hf, ours = pair
    if (getattr(hf.config, "rope_scaling", None) or {}).get("rope_type") == "dynamic":
        pytest.skip("dynamic NTK rescales every position once the sequence outgrows the original length, so a "
                    "cache filled earlier differs from a full forward (transformers' own cached decoding does the same)")
    ids = random_ids(2, 11, seed=3)
    with torch.no_grad():
        ref = hf(ids).logits
    model, info = ours.model, ours.info
    cache = KVCache(info, num_slots=4, max_len=32, dtype=torch.float32, device=torch.device("cpu"))
    slots = [2, 0]  # non-contiguous, out of order: exercises the gathered cache path
    prefill = ForwardBatch.build([ids[b, :5].tolist() for b in range(2)], [list(range(5))] * 2, slots, [0, 0], "cpu")
    with torch.no_grad():
        logits = model(prefill, cache)  # [rows, V]: each row's last token
        assert (logits - ref[:, 4]).abs().max() <= 1e-4
        for t in range(5, 11):
            step = ForwardBatch.build([[ids[b, t].item()] for b in range(2)], [[t]] * 2, slots, [t, t], "cpu")
            logits = model(step, cache)
            assert (logits - ref[:, t]).abs().max() <= 1e-4


def test_greedy_generation_equals_transformers(pair):
    hf, ours = pair
    prompt = random_ids(1, 6, seed=5)
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                          pad_token_id=0)[0, 6:].tolist()
    tokens = prompt[0].tolist()
    for _ in range(8):
        tokens.append(int(forward_sequences(ours.model, [tokens])[0][-1].argmax()))
    assert tokens[6:] == ref


def test_embedded_default_model_runs():
    lm = load_model(None)
    ids = lm.tokenizer("héllo wörld")["input_ids"]
    assert lm.tokenizer.decode(ids) == "héllo wörld"
    logits = forward_sequences(lm.model, [ids])[0]
    assert logits.shape == (len(ids), lm.info.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN pre-packing is CPU-only")
def test_pre_packed_linears_equal_the_plain_product_at_any_row_count_and_after_a_refresh():
    """FusedLinear's oneDNN pre-packed copy (packed for `batch_hint` rows) gives x @ W.T + b at
    any row count, and a refresh after the weights change (merge, reset) repacks it."""
    from adapter_runtime.models.common import FusedLinear

    g = torch.Generator().manual_seed(0)
    q, v = torch.nn.Linear(64, 64), torch.nn.Linear(64, 32, bias=False)
    fused = FusedLinear([q, v], pack=True, batch_hint=8)
    with torch.no_grad():
        for rows in (1, 5, 8, 13):
            x = torch.randn(rows, 64, generator=g)
            got_q, got_v = fused(x)
            torch.testing.assert_close(got_q, q(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_v, v(x), atol=1e-5, rtol=1e-5)
        q.weight.add_(torch.randn(q.weight.shape, generator=g))  # as a merge folds a delta in
        fused.refresh()
        x = torch.randn(8, 64, generator=g)
        torch.testing.assert_close(fused(x)[0], q(x), atol=1e-5, rtol=1e-5)
