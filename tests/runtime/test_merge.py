"""Merge and reset: the merged adapter keeps its outputs, everyone else keeps theirs, reset is
bit-exact, merged weights equal the `adapters` library's merge, and merges issued while
requests stream change nobody's output."""

from __future__ import annotations

import copy

import httpx
import pytest
import torch

from adapter_runtime import merge as merge_ops
from adapter_runtime.engine import Engine, EngineConfig, Request
from adapter_runtime.errors import AdapterConflict
from adapter_runtime.formats import load_adapter
from tests.support.packed import forward_sequences
from adapter_runtime.models import build_model, load_model
from adapter_runtime.sampling import SamplingParams
from tests.support.oracles import adapterhub_adapter, peft_adapter
from tests.support.live import start_server, stop_server
from tests.support.tiny import hf_model, random_ids, save_checkpoint

adapters_lib = pytest.importorskip("adapters")
peft = pytest.importorskip("peft")
from adapters import ConfigUnion, IA3Config as HubIA3, LoRAConfig as HubLoRA, SeqBnConfig  # noqa: E402
from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, VeraConfig  # noqa: E402

TOL = 1e-4


def make(kind: str, case: str, directory):
    if case == "peft-lora":
        targets = ["c_attn", "mlp.c_proj"] if kind == "gpt2" else ["q_proj", "v_proj", "down_proj"]
        return peft_adapter(kind, LoraConfig(r=4, lora_alpha=8, target_modules=targets), directory)[0]
    if case in ("peft-dora", "other-dora"):  # the other rows' per-row norm must ignore a merged delta
        targets = ["c_attn", "c_fc"] if kind == "gpt2" else ["q_proj", "v_proj"]
        return peft_adapter(kind, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=targets), directory,
                            seed=11 if case == "peft-dora" else 12)[0]
    if case == "peft-lokr":  # read as an exact LoRA of rank 8 x 2
        return peft_adapter(kind, LoKrConfig(r=2, alpha=3, target_modules=["q_proj", "down_proj"]), directory)[0]
    if case == "peft-ia3":  # feed-forward modules scale their input
        return peft_adapter(kind, IA3Config(), directory, ia3=True)[0]
    if case == "hub-lora":
        return adapterhub_adapter(kind, HubLoRA(r=4, alpha=8, attn_matrices=["q", "v"], intermediate_lora=True), directory)[0]
    if case == "hub-ia3":  # on GPT-2 the biases are scaled too (the library's merge forgets that)
        return adapterhub_adapter(kind, HubIA3(alpha=2.0), directory)[0]
    if case == "hub-union":
        return adapterhub_adapter(kind, ConfigUnion(HubLoRA(r=4, alpha=8), SeqBnConfig(reduction_factor=16)), directory)[0]
    raise ValueError(case)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return {kind: load_model(save_checkpoint(hf_model(kind), tmp_path_factory.mktemp(kind))) for kind in ("gpt2", "llama")}


@pytest.mark.parametrize("kind,case", [("gpt2", "peft-lora"), ("llama", "peft-lora"), ("llama", "peft-ia3"),
                                       ("gpt2", "hub-lora"), ("gpt2", "hub-ia3"), ("llama", "hub-union"),
                                       ("gpt2", "peft-dora"), ("llama", "peft-dora"), ("llama", "peft-lokr")])
def test_merge_keeps_every_output_and_reset_is_exact(bases, kind, case, tmp_path):
    """Rows: the merged adapter, a LoRA elsewhere, the base, and a DoRA on the merged sites
    (whose norm must be taken from the original weights)."""
    lm = bases[kind]
    model, info = lm.model, lm.info
    target = load_adapter(make(kind, case, tmp_path / "target"), info, "target")
    other = load_adapter(peft_adapter(kind, LoraConfig(r=2, target_modules=["c_fc"] if kind == "gpt2" else ["up_proj"]),
                                      tmp_path / "other", seed=7)[0], info, "other")
    dora = load_adapter(make(kind, "other-dora", tmp_path / "dora"), info, "dora")
    rows = random_ids(4, 10, seed=2).tolist()
    setups = [(target,), (other,), (), (dora,)]
    before = forward_sequences(model, rows, setups)
    assert (before[0] - before[2]).abs().max() > 1e-2, "the adapter must change the output"
    originals = {k: v.clone() for k, v in model.state_dict().items()}

    record = merge_ops.merge(model, target)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, originals[k])]
    assert changed, "a merge must change base weights"
    merged = forward_sequences(model, rows, setups, merged=record.merged)
    for b in range(4):
        assert (merged[b] - before[b]).abs().max().item() <= TOL

    merge_ops.reset(model, record)
    assert all(torch.equal(v, originals[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_merged_lora_weights_equal_adapterhub_merge(kind, tmp_path):
    config = HubLoRA(r=4, alpha=8, attn_matrices=["q", "k", "v"], intermediate_lora=True, output_lora=True)
    hf = hf_model(kind)
    ours = build_model(copy.deepcopy(hf.config), {k: v.clone() for k, v in hf.state_dict().items()}, torch.float32, "cpu")
    adapters_lib.init(hf)
    directory, hf = adapterhub_adapter(kind, config, tmp_path / "lora", hf=hf)
    hf.merge_adapter("ad")
    record = merge_ops.merge(ours, load_adapter(directory, ours.info, "ad"))
    theirs = hf.state_dict()
    for (layer, module) in record.originals:
        prefix = f"transformer.h.{layer}.{module}" if kind == "gpt2" else f"model.layers.{layer}.{module}"
        weight = theirs[f"{prefix}.weight"]
        weight = weight.T if kind == "gpt2" else weight  # Conv1D [in, out]
        assert (merge_ops.site_linear(ours, layer, module).weight - weight).abs().max() <= 1e-6, (layer, module)


FACTORED = {  # methods read as an exact LoRA; their merge must still be PEFT's W + dW
    "vera": lambda: VeraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "loha": lambda: LoHaConfig(r=2, alpha=3, target_modules=["q_proj", "down_proj"]),
    "lokr": lambda: LoKrConfig(r=2, alpha=3, target_modules=["k_proj", "up_proj"]),
    "adalora": lambda: AdaLoraConfig(init_r=4, total_step=10, target_modules=["q_proj", "o_proj"]),
}


@pytest.mark.parametrize("kind,case", [("gpt2", "peft-dora"), ("llama", "peft-dora"),
                                       *(("llama", f) for f in FACTORED)])
def test_merged_weights_equal_peft_merge(kind, case, tmp_path):
    """DoRA: W' = diag(m / ||W + s B A||) (W + s B A), the bias untouched; the others W + dW:
    PEFT's merge_and_unload."""
    if case in FACTORED:
        directory = peft_adapter(kind, FACTORED[case](), tmp_path / case)[0]
    else:
        directory = make(kind, case, tmp_path / "dora")
    hf = hf_model(kind)
    ours = build_model(copy.deepcopy(hf.config), {k: v.clone() for k, v in hf.state_dict().items()}, torch.float32, "cpu")
    theirs = peft.PeftModel.from_pretrained(hf, directory).merge_and_unload().state_dict()
    record = merge_ops.merge(ours, load_adapter(directory, ours.info, case))
    for (layer, module) in record.originals:
        prefix = f"transformer.h.{layer}.{module}" if kind == "gpt2" else f"model.layers.{layer}.{module}"
        weight = theirs[f"{prefix}.weight"]
        weight = weight.T if kind == "gpt2" else weight  # Conv1D [in, out]
        linear = merge_ops.site_linear(ours, layer, module)
        assert (linear.weight - weight).abs().max() <= 1e-6, (layer, module)
        if linear.bias is not None:
            assert torch.equal(linear.bias, theirs[f"{prefix}.bias"])


def test_unmergeable_adapters_are_refused_and_change_nothing(bases, tmp_path):
    lm = bases["gpt2"]
    bottleneck = load_adapter(adapterhub_adapter("gpt2", SeqBnConfig(), tmp_path / "bn")[0], lm.info, "bn")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with pytest.raises(AdapterConflict, match="only LoRA and"):
        merge_ops.merge(lm.model, bottleneck)
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


def test_a_merge_that_would_overflow_is_refused_and_changes_nothing(bases, tmp_path):
    """Finite LoRA weights whose product overflows fp32 at the last of several sites: refused
    with NumericOverflow, and the sites merged before it are back bit for bit."""
    from adapter_runtime.errors import NumericOverflow

    lm = bases["llama"]
    lora = load_adapter(make("llama", "peft-lora", tmp_path / "lora"), lm.info, "huge")
    last = list(lora.linear)[-1]  # merged in this order: the last site overflows after the others merged
    effect = lora.linear[last]
    lora.linear[last] = type(effect)(effect.A * 1e30, effect.B * 1e30, effect.scale)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    assert len(lora.linear) > 1
    with pytest.raises(NumericOverflow, match=f"'huge'.*layer {last[0]} {last[1]} non-finite.*nothing was merged"):
        merge_ops.merge(lm.model, lora)
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


def test_merge_and_reset_while_streams_run(bases, tmp_path):
    """16 greedy requests over several adapters; merge, reset and merge again while they run:
    every completion equals the one it gives alone, with nothing merged."""
    lm = bases["llama"]
    engine = Engine(lm, config=EngineConfig(max_batch=16, max_seq_len=64))
    for name, case in (("lora", "peft-lora"), ("ia3", "peft-ia3"), ("union", "hub-union"), ("dora", "peft-dora")):
        engine.registry.register(name, load_adapter(make("llama", case, tmp_path / name), lm.info, name))
    names = ["lora", "ia3", "union", "dora", None]
    prompts = random_ids(16, 6, seed=9).tolist()

    def request(i):
        setup = () if names[i % 5] is None else engine.registry.resolve(names[i % 5])
        return Request(tuple(prompts[i]), SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True), setup)

    with engine:
        alone = [engine.submit(request(i)).result(60).token_ids for i in range(16)]
        handles = [engine.submit(request(i)) for i in range(16)]
        for op in (lambda: engine.merge("lora"), engine.reset, lambda: engine.merge("ia3"), engine.reset,
                   lambda: engine.merge("dora"), engine.reset, lambda: engine.merge("union")):
            op()
        results = [h.result(60).token_ids for h in handles]
        assert engine.merged_name == "union"
        engine.reset()
    assert results == alone


def test_merge_endpoints(bases, tmp_path):
    ckpt = save_checkpoint(hf_model("gpt2"), tmp_path / "ckpt")
    lora = make("gpt2", "peft-lora", tmp_path / "lora")
    bn = adapterhub_adapter("gpt2", SeqBnConfig(), tmp_path / "bn")[0]
    proc, url = start_server("--model", str(ckpt), "--adapter", f"lora={lora}", "--adapter", f"bn={bn}")
    try:
        def complete(model):
            r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": [5, 6, 7], "max_tokens": 8,
                                                           "temperature": 0, "logprobs": 1}, timeout=60)
            r.raise_for_status()
            return r.json()["choices"][0]

        before = {m: complete(m) for m in ("ckpt", "lora", "bn")}
        refused = httpx.post(f"{url}/v1/merge", json={"adapter": "bn"})
        assert refused.status_code == 409 and "only LoRA" in refused.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/merge").json() == {"merged": None}
        assert httpx.post(f"{url}/v1/merge", json={"adapter": "lora"}).json() == {"merged": "lora"}
        assert httpx.get(f"{url}/v1/merge").json() == {"merged": "lora"}
        again = httpx.post(f"{url}/v1/merge", json={"adapter": "bn"})
        assert again.status_code == 409
        during = {m: complete(m) for m in ("ckpt", "lora", "bn")}
        assert httpx.post(f"{url}/v1/merge/reset").json() == {"merged": None}
        for m in before:
            assert during[m]["text"] == before[m]["text"]
            lp_before = before[m]["logprobs"]["token_logprobs"]
            lp_during = during[m]["logprobs"]["token_logprobs"]
            assert max(abs(a - b) for a, b in zip(lp_before, lp_during)) <= TOL
        assert httpx.post(f"{url}/v1/merge", json={"adapter": "nope"}).status_code == 404
    finally:
        stop_server(proc)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])  # llama: grouped-query, where the library's eject crashes
def test_store_exports_prefix_ejected_and_the_library_loads_it_back(kind, tmp_path):
    import io
    import json
    import zipfile

    from adapters import PrefixTuningConfig

    from adapter_runtime.store import AdapterStore

    directory, trained = adapterhub_adapter(kind, PrefixTuningConfig(prefix_length=6, bottleneck_size=32),
                                            tmp_path / "prefix")
    ids = random_ids(2, 8, seed=3)
    with torch.no_grad():
        expected = trained(ids, use_cache=False).logits
    lm = load_model(save_checkpoint(hf_model(kind), tmp_path / "base"))
    store = AdapterStore(tmp_path / "store", lm.info)
    store.add("prefix", directory)
    buffer = io.BytesIO()
    store.write_zip("prefix", buffer)
    exported = tmp_path / "exported"
    zipfile.ZipFile(buffer).extractall(exported)
    config = json.loads((exported / "adapter_config.json").read_text())
    assert config["config"]["flat"] is True

    fresh = hf_model(kind)
    adapters_lib.init(fresh)
    fresh.load_adapter(str(exported), load_as="prefix", set_active=True, use_safetensors=True)
    with torch.no_grad():
        got = fresh.eval()(ids, use_cache=False).logits
    assert (got - expected).abs().max().item() <= TOL
    assert (expected - hf_model(kind)(ids).logits).abs().max().item() > 1e-2
