"""PEFT reader against PEFT 0.21.2 itself: adapters made with `get_peft_model`, randomized
(default inits are identities), saved with `save_pretrained`, reloaded by PEFT as the oracle,
and read by `load_adapter` into our model built from the same base checkpoint."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from adapter_runtime.errors import AdapterFormatError, AdapterIncompatible, AdapterUnsupported
from adapter_runtime.formats import load_adapter
from tests.support.packed import forward_sequences
from adapter_runtime.models import load_model
from tests.support.oracles import peft_adapter
from tests.support.tiny import hf_model, random_ids, save_checkpoint

peft = pytest.importorskip("peft")
from peft import (AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftModel,  # noqa: E402
                  PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, VeraConfig, get_peft_model)

TOL = 1e-4
KINDS = ("gpt2", "llama")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Per family: (checkpoint dir, our model). The HF model is rebuilt per test (same seed)
    because PEFT injects its layers into the model it wraps."""
    out = {}
    for kind in KINDS:
        ckpt = save_checkpoint(hf_model(kind), tmp_path_factory.mktemp(f"base-{kind}"))
        out[kind] = (ckpt, load_model(ckpt).model)
    return out


def make_adapter(kind, config, directory, ia3: bool = False, seed: int = 1, **model_overrides):
    """Wrap a fresh base with PEFT, randomize every trainable (adapter) parameter, save."""
    return peft_adapter(kind, config, directory, seed=seed, ia3=ia3, **model_overrides)[0]


def oracle(kind, directory):
    """PEFT's own reload of the saved adapter (eval mode, eager attention)."""
    return PeftModel.from_pretrained(hf_model(kind), directory).eval()


def check_logits(kind, bases, directory, virtual_tokens: int = 0):
    """Our logits for [adapter, base, adapter] rows (one mixed batch) vs PEFT and the HF base."""
    _, ours = bases[kind]
    adapter = load_adapter(directory, ours.info)
    ids = random_ids(2, 7, seed=3)
    with torch.no_grad():
        want = oracle(kind, directory)(input_ids=ids).logits[:, virtual_tokens:]  # [B, T, V]
        base = hf_model(kind)(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-2, "adapter is an identity: the test would prove nothing"
    rows = [ids[0].tolist(), ids[0].tolist(), ids[1].tolist()]
    got = forward_sequences(ours, rows, [(adapter,), (), (adapter,)])
    assert (got[0] - want[0]).abs().max() <= TOL
    assert (got[1] - base[0]).abs().max() <= TOL
    assert (got[2] - want[1]).abs().max() <= TOL
    return adapter


def check_greedy(kind, bases, directory, steps: int = 6):
    """PEFT greedy `generate` vs a plain loop that re-runs forward_sequences on the sequence."""
    _, ours = bases[kind]
    adapter = load_adapter(directory, ours.info)
    ids = random_ids(1, 5, seed=4)
    with torch.no_grad():
        out = oracle(kind, directory).generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                               max_new_tokens=steps, do_sample=False, pad_token_id=0)
    want = out[0, ids.shape[1]:].tolist()
    tokens = ids[0].tolist()
    for _ in want:
        tokens.append(int(forward_sequences(ours, [tokens], [(adapter,)])[0][-1].argmax()))
    assert tokens[ids.shape[1]:] == want


# --------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("kind", KINDS)
def test_lora_defaults(kind, bases, tmp_path):
    d = make_adapter(kind, LoraConfig(task_type="CAUSAL_LM"), tmp_path)
    adapter = check_logits(kind, bases, d)
    modules = {m for _, m in adapter.linear}
    assert modules == ({"attn.c_attn"} if kind == "gpt2" else {"self_attn.q_proj", "self_attn.v_proj"})


def test_lora_patterns_rslora_gpt2(bases, tmp_path):
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
                        r=4, lora_alpha=8, use_rslora=True,
                        rank_pattern={"h.1.attn.c_attn": 2, "c_fc": 6},
                        alpha_pattern={"attn.c_proj": 3, "h.0.attn.c_attn": 5})
    adapter = check_logits("gpt2", bases, make_adapter("gpt2", config, tmp_path))
    assert adapter.linear[(1, "attn.c_attn")].A.shape[0] == 2
    assert adapter.linear[(0, "attn.c_attn")].scale == pytest.approx(5 / 2)  # alpha 5, rsLoRA sqrt(4)
    assert adapter.linear[(0, "mlp.c_fc")].scale == pytest.approx(8 / 6**0.5)


def test_lora_all_linear_patterns_llama(bases, tmp_path):
    # two rank patterns match layer 0's q_proj: the first in dict order wins
    config = LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", r=4, lora_alpha=16, use_rslora=True,
                        rank_pattern={"layers.0.self_attn.q_proj": 2, "q_proj": 6},
                        alpha_pattern={"v_proj": 32, "down_proj": 3})
    adapter = check_logits("llama", bases, make_adapter("llama", config, tmp_path))
    assert len(adapter.linear) == 2 * 7
    assert adapter.linear[(0, "self_attn.q_proj")].A.shape[0] == 2
    assert adapter.linear[(1, "self_attn.q_proj")].A.shape[0] == 6


@pytest.mark.parametrize("kind", KINDS)
def test_lora_bias(kind, bases, tmp_path):
    targets = ["c_attn", "c_proj"] if kind == "gpt2" else ["q_proj", "o_proj", "gate_proj"]
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=targets, lora_bias=True, r=4, lora_alpha=12)
    adapter = check_logits(kind, bases, make_adapter(kind, config, tmp_path))
    assert all(e.bias is not None for e in adapter.linear.values())


def test_lora_legacy_bin(bases, tmp_path):
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=["c_attn", "c_proj"])
    model = get_peft_model(hf_model("gpt2"), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    model.eval().save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists() and not (tmp_path / "adapter_model.safetensors").exists()
    check_logits("gpt2", bases, tmp_path)


# --------------------------------------------------------------------------- IA3


@pytest.mark.parametrize("kind", KINDS)
def test_ia3_defaults(kind, bases, tmp_path):
    d = make_adapter(kind, IA3Config(task_type="CAUSAL_LM"), tmp_path, ia3=True)
    adapter = check_logits(kind, bases, d)
    ff = "mlp.c_proj" if kind == "gpt2" else "mlp.down_proj"
    assert adapter.linear[(0, ff)].on_input  # feed-forward: scales the input
    assert not adapter.linear[(0, "attn.c_attn" if kind == "gpt2" else "self_attn.k_proj")].on_input


# --------------------------------------------------------------------------- prompt learning


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_tuning(kind, bases, tmp_path):
    d = make_adapter(kind, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5), tmp_path)
    check_logits(kind, bases, d, virtual_tokens=5)
    check_greedy(kind, bases, d)


@pytest.mark.parametrize("kind", KINDS)
def test_p_tuning(kind, bases, tmp_path):
    config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32)
    d = make_adapter(kind, config, tmp_path)
    assert load_adapter(d, bases[kind][1].info).method == "p_tuning"
    check_logits(kind, bases, d, virtual_tokens=4)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_prefix_tuning(kind, projection, bases, tmp_path):
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=projection,
                                encoder_hidden_size=32)
    d = make_adapter(kind, config, tmp_path)
    adapter = check_logits(kind, bases, d)
    info = bases[kind][1].info
    assert adapter.prefix.shifts_positions and adapter.prefix.length == 4
    assert adapter.prefix.keys[1].shape == (info.num_kv_heads, 4, info.head_dim)
    check_greedy(kind, bases, d)


# --------------------------------------------------------------------------- refusals


def refused(kind, bases, directory, error, *words):
    with pytest.raises(error) as e:
        load_adapter(directory, bases[kind][1].info)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_refuses_modules_to_save(bases, tmp_path):
    config = LoraConfig(task_type="CAUSAL_LM", modules_to_save=["ln_f"])
    refused("gpt2", bases, make_adapter("gpt2", config, tmp_path), AdapterUnsupported, "modules_to_save", "ln_f")


def test_refuses_base_bias(bases, tmp_path):
    config = LoraConfig(task_type="CAUSAL_LM", bias="lora_only")
    refused("gpt2", bases, make_adapter("gpt2", config, tmp_path), AdapterUnsupported, "bias='lora_only'")


def test_refuses_pissa(bases, tmp_path):
    config = LoraConfig(task_type="CAUSAL_LM", init_lora_weights="pissa")
    refused("llama", bases, make_adapter("llama", config, tmp_path), AdapterUnsupported, "pissa")


@pytest.mark.parametrize("kind", KINDS)
def test_dora(kind, bases, tmp_path):
    """DoRA renormalizes each output row of W + s B A by the saved magnitude; rows of other
    adapters in the same batch are unaffected. It can be merged (tests/runtime/test_merge.py)."""
    from adapter_runtime.merge import why_not_mergeable

    targets = ["c_attn", "mlp.c_fc"] if kind == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, use_dora=True, target_modules=targets)
    directory = make_adapter(kind, config, tmp_path)
    check_logits(kind, bases, directory)
    assert why_not_mergeable(load_adapter(directory, bases[kind][1].info, "dora")) is None


# --------------------------------------------------------------------------- VeRA, LoHa, LoKr, AdaLoRA
# Each is read as an exact LoRA (formats/as_lora.py); PEFT itself is the oracle.


@pytest.mark.parametrize("kind", KINDS)
def test_vera(kind, bases, tmp_path):
    """The shared projections are sized to the largest adapted layer and sliced per layer
    (GPT-2: c_attn 64->192 and c_fc 64->256; Llama: q 64->64, GQA v 64->32, down 128->64)."""
    targets = ["c_attn", "c_fc"] if kind == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    config = VeraConfig(task_type="CAUSAL_LM", r=6, target_modules=targets)
    adapter = check_logits(kind, bases, make_adapter(kind, config, tmp_path))
    assert adapter.method == "vera" and all(e.A.shape[0] == 6 for e in adapter.linear.values())
    if kind == "gpt2":  # Llama's greedy tokens are checked in the mixed batch (tests/runtime/test_mixed.py)
        check_greedy(kind, bases, tmp_path)


def test_vera_projection_regenerated_from_its_key(bases, tmp_path):
    """save_projection=False: PEFT rebuilds A and B from projection_prng_key; so do we."""
    config = VeraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj", "up_proj"],
                        save_projection=False, projection_prng_key=1234)
    directory = make_adapter("llama", config, tmp_path)
    from safetensors.torch import load_file

    assert not any("vera_A" in k for k in load_file(directory / "adapter_model.safetensors"))
    check_logits("llama", bases, directory)


def test_loha(bases, tmp_path):
    """(w1a w1b) * (w2a w2b) as a LoRA of rank r^2; per-module rank/alpha patterns. PEFT's
    LoHa cannot wrap GPT-2's Conv1D, so Llama is the only family with LoHa adapters."""
    config = LoHaConfig(task_type="CAUSAL_LM", r=3, alpha=5, target_modules=["q_proj", "v_proj", "down_proj"],
                        rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 11})
    adapter = check_logits("llama", bases, make_adapter("llama", config, tmp_path))
    assert adapter.linear[(0, "self_attn.q_proj")].A.shape[0] == 9
    assert adapter.linear[(0, "self_attn.v_proj")].A.shape[0] == 4
    assert adapter.linear[(1, "self_attn.q_proj")].scale == pytest.approx(11 / 3)


@pytest.mark.parametrize("options", [
    dict(r=4, alpha=6),  # w1 full, w2 full on 64x64 (r >= half the factor), low-rank w2 on down_proj
    dict(r=2, alpha=6, decompose_both=True),  # both factors low-rank
    dict(r=1, alpha=3, decompose_factor=4, rank_pattern={"q_proj": 2}),  # other factor shapes
], ids=["default", "decompose-both", "factor-4"])
def test_lokr(options, bases, tmp_path):
    config = LoKrConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"], **options)
    adapter = check_logits("llama", bases, make_adapter("llama", config, tmp_path))
    assert all(e.A.shape[0] <= min(e.A.shape[1], e.B.shape[0]) for e in adapter.linear.values())


def test_factored_rank_counts_against_max_lora_rank(bases, tmp_path):
    """LoKr r=2 with a full 8x8 factor is served as a rank-16 LoRA: the store's max_lora_rank
    applies to that rank, not to the config's r."""
    from adapter_runtime.store import AdapterStore, StoreLimits

    directory = make_adapter("llama", LoKrConfig(task_type="CAUSAL_LM", r=2, alpha=4, target_modules=["q_proj"],
                                                 decompose_factor=8), tmp_path / "lokr")
    info = bases["llama"][1].info
    assert max(e.A.shape[0] for e in load_adapter(directory, info).linear.values()) == 16
    with pytest.raises(AdapterUnsupported, match="rank 16"):
        AdapterStore(tmp_path / "store", info, StoreLimits(max_lora_rank=8)).add("lokr", directory)
    AdapterStore(tmp_path / "store", info, StoreLimits(max_lora_rank=16)).add("lokr", directory)


def adalora_adapter(kind, directory, targets, seed=1):
    """A few real AdaLoRA training steps, so that the rank allocation prunes: the saved tensors
    are cut to the kept ranks (some modules to rank 0) and the config holds the masks."""
    config = AdaLoraConfig(task_type="CAUSAL_LM", init_r=6, target_r=2, tinit=0, tfinal=1, deltaT=1, total_step=4,
                           lora_alpha=10, target_modules=targets)
    model = get_peft_model(hf_model(kind), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = random_ids(2, 8, seed=seed)
    model.train()
    for step in range(4):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    model.eval().save_pretrained(directory)
    return directory


@pytest.mark.parametrize("kind", KINDS)
def test_adalora(kind, bases, tmp_path):
    targets = ["c_attn", "mlp.c_proj"] if kind == "gpt2" else ["q_proj", "v_proj", "up_proj"]
    directory = adalora_adapter(kind, tmp_path, targets)
    saved = json.loads((directory / "adapter_config.json").read_text())
    assert saved["rank_pattern"], "the rank allocation must have run"
    adapter = check_logits(kind, bases, directory)
    assert all(0 < e.A.shape[0] < 6 for e in adapter.linear.values())
    assert len(adapter.linear) == sum(1 for mask in saved["rank_pattern"].values() if any(mask))  # rank 0: no effect
    assert next(iter(adapter.linear.values())).scale == pytest.approx(10 / 6, rel=1e-5)  # alpha / init_r
    if kind == "gpt2":  # Llama's greedy tokens are checked in the mixed batch (tests/runtime/test_mixed.py)
        check_greedy(kind, bases, directory)


def test_refuses_loha_convolution_keys(bases, tmp_path):
    make_adapter("llama", LoHaConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]), tmp_path)
    from safetensors.torch import load_file, save_file

    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.hada_t1"] = torch.zeros(8, 8, 1, 1)
    save_file(tensors, path, metadata={"format": "pt"})
    refused("llama", bases, tmp_path, AdapterUnsupported, "hada_t1", "convolution")


def test_refuses_wrong_shape(bases, tmp_path):
    from safetensors.torch import load_file, save_file

    make_adapter("llama", LoraConfig(task_type="CAUSAL_LM"), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = torch.zeros(48, tensors[key].shape[1])  # v_proj has 32 outputs (2 KV heads)
    save_file(tensors, path, metadata={"format": "pt"})
    refused("llama", bases, tmp_path, AdapterIncompatible, "layers.1.self_attn.v_proj.lora_B", "[48, 8]")


@pytest.mark.parametrize("kind", KINDS)
def test_refuses_wrong_layer_count(kind, bases, tmp_path):
    layers = {"n_layer": 3} if kind == "gpt2" else {"num_hidden_layers": 3}
    make_adapter(kind, LoraConfig(task_type="CAUSAL_LM"), tmp_path / "lora", **layers)
    refused(kind, bases, tmp_path / "lora", AdapterIncompatible, "layer 2", "2 layers")
    prefix = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    make_adapter(kind, prefix, tmp_path / "prefix", **layers)
    refused(kind, bases, tmp_path / "prefix", AdapterIncompatible, "num_layers=3")


def test_refuses_wrong_model_type(bases, tmp_path):
    # task_type None makes PEFT record the base class in auto_mapping
    make_adapter("gpt2", LoraConfig(target_modules=["c_attn"]), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["auto_mapping"]["base_model_class"]
    refused("llama", bases, tmp_path, AdapterIncompatible, "GPT2LMHeadModel", "llama")


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_refuses_malicious_pickle(bases, tmp_path):
    make_adapter("gpt2", LoraConfig(task_type="CAUSAL_LM"), tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    payload = _Payload()
    payload.marker = tmp_path / "pwned"
    with open(tmp_path / "adapter_model.bin", "wb") as f:
        pickle.dump({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": payload}, f)
    refused("gpt2", bases, tmp_path, AdapterFormatError, "adapter_model.bin")
    assert not payload.marker.exists()


@pytest.mark.parametrize("option, value", [
    ("layer_replication", [[0, 2]]),
    ("alora_invocation_tokens", [1, 2]),
    ("init_lora_weights", "olora"),
    ("init_lora_weights", "corda"),
    ("use_bdlora", True),
    ("task_type", "SEQ_CLS"),
])
def test_refuses_config_options(option, value, bases, tmp_path):
    """Options whose effect is not in the tensors: edited into a saved LoRA config."""
    make_adapter("llama", LoraConfig(task_type="CAUSAL_LM"), tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config[option] = value
    path.write_text(json.dumps(config))
    refused("llama", bases, tmp_path, AdapterUnsupported, option)


def test_refuses_embedding_targets(bases, tmp_path):
    # LoRA on embed_tokens also ships the full base embedding matrices (reference §1.2)
    make_adapter("llama", LoraConfig(task_type="CAUSAL_LM", target_modules=["embed_tokens", "q_proj"]), tmp_path)
    refused("llama", bases, tmp_path, AdapterUnsupported, "embed")


def test_refuses_trainable_tokens(bases, tmp_path):
    config = LoraConfig(task_type="CAUSAL_LM", trainable_token_indices=[5, 7])
    refused("llama", bases, make_adapter("llama", config, tmp_path), AdapterUnsupported, "trainable_token_indices")
