"""AdapterHub reader against the `adapters` 1.3.0 library as oracle.

Each case: a tiny HF model, `adapters.init`, add the adapter, randomize every adapter parameter
(default inits make many adapters identities), library logits (eager, use_cache=False),
`save_adapter`, then our reader + our model built from the base weights saved before
`adapters.init`, compared with max |Δlogit| <= 1e-4 in fp32.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

adapters = pytest.importorskip("adapters")
from adapters import (  # noqa: E402
    AdapterPlusConfig,
    BnConfig,
    CompacterConfig,
    CompacterPlusPlusConfig,
    ConfigUnion,
    DoRAConfig,
    DoubleSeqBnConfig,
    DoubleSeqBnInvConfig,
    DvoRAConfig,
    IA3Config,
    LoRAConfig,
    MAMConfig,
    MTLLoRAConfig,
    ParBnConfig,
    PrefixTuningConfig,
    SeqBnConfig,
    SeqBnInvConfig,
    UniPELTConfig,
    VeraConfig,
)
from adapters.composition import Stack  # noqa: E402

from adapter_runtime.adapters import Adapter  # noqa: E402
from adapter_runtime.errors import AdapterFormatError, AdapterIncompatible, AdapterUnsupported, InvalidRequest  # noqa: E402
from adapter_runtime.formats import load_adapter  # noqa: E402
from adapter_runtime.composition import validate_stack  # noqa: E402
from tests.support.packed import forward_sequences  # noqa: E402
from adapter_runtime.models import build_model  # noqa: E402
from tests.support.oracles import greedy_library  # noqa: E402
from tests.support.tiny import hf_model, random_ids  # noqa: E402

TOL = 1e-4
BATCH, SEQ = 2, 9


# ----------------------------------------------------------------------------- helpers


def ours_from(hf):
    """Our model from the HF model's current (base) weights; call before adapters.init."""
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    return build_model(copy.deepcopy(hf.config), state, torch.float32, torch.device("cpu"))


def randomize_adapter(hf, name: str, scale: float, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    pattern = re.compile(rf"\.{re.escape(name)}\.")
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if pattern.search(pname + "."):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def library_logits(hf, ids) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids, use_cache=False).logits


def our_logits(model, ids, setup) -> torch.Tensor:
    return torch.stack(forward_sequences(model, ids.tolist(), [tuple(setup)] * ids.shape[0]))


def setup_case(kind, configs: dict, tmp_path, hidden=64, scale=0.5, **overrides):
    """-> (hf with the adapters added and randomized, our model, {name: saved dir})."""
    hf = hf_model(kind, hidden=hidden, **overrides)
    ours = ours_from(hf)
    adapters.init(hf)
    tmp_path.mkdir(parents=True, exist_ok=True)
    dirs = {}
    for i, (name, config) in enumerate(configs.items()):
        hf.add_adapter(name, config=config)
        randomize_adapter(hf, name, scale, seed=i + 1)
        dirs[name] = tmp_path / name
    return hf, ours, dirs


def assert_close(lib, got, base):
    err = (lib - got).abs().max().item()
    assert err <= TOL, f"max |Δlogit| = {err}"
    assert (lib - base).abs().max().item() > 1e-2, "the adapter has no effect: the comparison proves nothing"


def check_single(kind, config, tmp_path, hidden=64, scale=0.5, eject=False, safetensors=False, **overrides):
    hf, ours, dirs = setup_case(kind, {"ad": config}, tmp_path, hidden, scale, **overrides)
    if eject:
        hf.eject_prefix_tuning("ad")
    hf.set_active_adapters("ad")
    ids = random_ids(BATCH, SEQ)
    lib = library_logits(hf, ids)
    hf.save_adapter(str(dirs["ad"]), "ad", use_safetensors=safetensors)
    adapter = load_adapter(dirs["ad"], ours.info)
    assert adapter.format == "adapterhub" and adapter.name == "ad"
    assert_close(lib, our_logits(ours, ids, [adapter]), our_logits(ours, ids, []))
    return adapter, dirs["ad"], ours


# ----------------------------------------------------------------------------- every family

PREFIX = dict(prefix_length=7, bottleneck_size=32)
CASES = {
    "seq_bn": lambda: SeqBnConfig(),
    "double_seq_bn": lambda: DoubleSeqBnConfig(),
    "par_bn": lambda: ParBnConfig(),
    "bn_ln_before_after_leave_out": lambda: BnConfig(
        mh_adapter=True, output_adapter=True, reduction_factor=8, non_linearity="relu",
        ln_before=True, ln_after=True, leave_out=[0]),
    "bn_rf_mapping_channel_no_orig_after": lambda: BnConfig(
        mh_adapter=True, output_adapter=True, reduction_factor={"0": 4, "default": 16}, non_linearity="tanh",
        scaling="channel", original_ln_after=False, residual_before_ln=False),
    "bn_learned_gating_adapter_res_before_ln": lambda: BnConfig(
        mh_adapter=False, output_adapter=True, reduction_factor=8, non_linearity="gelu", scaling="learned",
        use_gating=True, adapter_residual_before_ln=True, ln_after=True),
    "par_bn_lns_both_locations": lambda: BnConfig(
        mh_adapter=True, output_adapter=True, is_parallel=True, reduction_factor=4, scaling=2.0,
        original_ln_before=False, ln_before=True, ln_after=True, non_linearity="leakyrelu"),
    "seq_bn_inv": lambda: SeqBnInvConfig(),
    "double_seq_bn_inv": lambda: DoubleSeqBnInvConfig(),
    "prefix_mlp": lambda: PrefixTuningConfig(**PREFIX),
    "prefix_flat": lambda: PrefixTuningConfig(flat=True, **PREFIX),
    "prefix_leave_out": lambda: PrefixTuningConfig(leave_out=[0], **PREFIX),
    "lora_qv": lambda: LoRAConfig(r=8, alpha=16),
    "lora_qkv_inter_out": lambda: LoRAConfig(r=4, alpha=3, attn_matrices=["q", "k", "v"],
                                             intermediate_lora=True, output_lora=True),
    "lora_reversed_vk": lambda: LoRAConfig(r=4, alpha=3, attn_matrices=["v", "k"]),
    "lora_leave_out_o_ignored": lambda: LoRAConfig(r=2, alpha=4, attn_matrices=["q", "o"], leave_out=[1],
                                                   output_lora=True),
    "ia3": lambda: IA3Config(),
    "ia3_alpha2": lambda: IA3Config(alpha=2),
    "ia3_qkv_out_alpha2": lambda: IA3Config(alpha=2, attn_matrices=["q", "k", "v"], output_lora=True),
    "mam": lambda: MAMConfig(),
    "unipelt_ungated_prefix": lambda: ConfigUnion(
        PrefixTuningConfig(prefix_length=5, bottleneck_size=32), SeqBnConfig(use_gating=True),
        LoRAConfig(r=8, alpha=2, use_gating=True)),
    "union_lora_seq_bn": lambda: ConfigUnion(LoRAConfig(r=4), SeqBnConfig()),
}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_library(kind, case, tmp_path):
    check_single(kind, CASES[case](), tmp_path)


# Methods added to the library after the seed reference (reference §8). Each runs where the
# library itself can run it: VeRA needs all adapted layers of one shape (MHA Llama for q,v), DoRA
# cannot be built on GPT-2, MTL-LoRA and VeRA do not run on GPT-2's fused c_attn.
MHA = {"num_key_value_heads": 4}
NEW_METHOD_CASES = {
    "vera_qv_mha": (lambda: VeraConfig(r=4), ["llama"], MHA),
    "vera_q_gated": (lambda: VeraConfig(r=6, attn_matrices=["q"], use_gating=True), ["llama"], {}),
    "vera_mlp_in": (lambda: VeraConfig(r=4, alpha=2, selfattn_lora=False, intermediate_lora=True), ["gpt2"], {}),
    "dora_qv_out": (lambda: DoRAConfig(r=4, alpha=4, output_lora=True), ["llama"], {}),
    "dvora_qv_mha": (lambda: DvoRAConfig(r=4, alpha=4), ["llama"], MHA),
    "mtl_lora": (lambda: MTLLoRAConfig(r=4, n_up_projection=3, intermediate_lora=True), ["llama"], {}),
    "mtl_lora_mlp_gated": (lambda: MTLLoRAConfig(r=2, n_up_projection=2, selfattn_lora=False, intermediate_lora=True,
                                                 output_lora=True, use_gating=True), ["gpt2"], {}),
    "adapter_plus": (lambda: AdapterPlusConfig(reduction_factor=8, stochastic_depth=0.0), ["gpt2", "llama"], {}),
}


@pytest.mark.parametrize("kind,case", [(k, c) for c, (_, kinds, _) in NEW_METHOD_CASES.items() for k in kinds])
def test_new_methods_match_library(kind, case, tmp_path):
    config, _, overrides = NEW_METHOD_CASES[case]
    adapter, _, _ = check_single(kind, config(), tmp_path, **overrides)
    assert adapter.method == {"vera": "vera", "dora": "dora", "dvor": "dvora", "mtl_": "mtl_lora",
                              "adap": "bottleneck"}[case[:4]]


def test_adapter_plus_stochastic_depth_is_identity_at_inference(tmp_path):
    """AdapterPlus trains with stochastic depth 0.1 (torchvision's drop path, identity in eval):
    the saved config says so, and the forward is the same as with 0.0."""
    adapter, directory, ours = check_single("llama", AdapterPlusConfig(reduction_factor=8, stochastic_depth=0.0), tmp_path)
    d = broken_copy(directory, tmp_path / "sd", lambda m: m["config"].update(stochastic_depth=0.1))
    again = load_adapter(d, ours.info)
    ids = random_ids(BATCH, SEQ)
    assert torch.equal(our_logits(ours, ids, [adapter]), our_logits(ours, ids, [again]))


def test_mtl_lora_multitask_rows_equal_each_task_adapter(tmp_path):
    """MultiTask(t1, t2) with shared A/B routes rows by task_ids; each task adapter saved alone
    and requested per row gives the same logits (the MultiTask block is per-row routing)."""
    from adapters.composition import MultiTask

    config = MTLLoRAConfig(r=4, n_up_projection=2, output_lora=True)
    hf, ours, dirs = setup_case("llama", {"t1": config, "t2": config}, tmp_path)
    hf.share_parameters(adapter_names=["t1", "t2"], name="shared")
    randomize_adapter(hf, "shared", 0.5, seed=9)
    hf.set_active_adapters(MultiTask("t1", "t2"))
    ids = random_ids(BATCH, SEQ)
    with torch.no_grad():
        lib = hf(ids, task_ids=torch.tensor([0, 1]), use_cache=False).logits
    for name, d in dirs.items():
        hf.save_adapter(str(d), name)
    setups = [(load_adapter(dirs["t1"], ours.info),), (load_adapter(dirs["t2"], ours.info),)]
    got = torch.stack(forward_sequences(ours, ids.tolist(), setups))
    assert_close(lib, got, our_logits(ours, ids, []))


COMPACTER_CASES = {
    "compacter": (lambda: CompacterConfig(), ["gpt2", "llama"]),
    "compacter_pp": (lambda: CompacterPlusPlusConfig(), ["gpt2", "llama"]),
    "compacter_nonshared_factorized_rule": (
        lambda: CompacterConfig(shared_phm_rule=False, factorized_phm_rule=True), ["gpt2", "llama"]),
    "compacter_pp_shared_W": (lambda: CompacterPlusPlusConfig(shared_W_phm=True), ["gpt2"]),
    "compacter_pp_rank2_factorized_rule_no_bias": (
        lambda: CompacterPlusPlusConfig(phm_rank=2, factorized_phm_rule=True, phm_bias=False), ["gpt2"]),
    "compacter_pp_phm_dim8_full_W": (
        lambda: CompacterPlusPlusConfig(phm_dim=8, reduction_factor=16, factorized_phm_W=False), ["gpt2"]),
}


@pytest.mark.parametrize(
    "kind,case", [(k, c) for c, (_, kinds) in COMPACTER_CASES.items() for k in kinds]
)
def test_compacter_matches_library(kind, case, tmp_path):
    check_single(kind, COMPACTER_CASES[case][0](), tmp_path, hidden=128)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_ejected_prefix_is_read_as_flat(kind, tmp_path):
    """Ejected files keep `flat: false`; the 1-D control_trans says flat. Eject needs nkv == nh."""
    overrides = {"num_key_value_heads": 4} if kind == "llama" else {}
    adapter, directory, _ = check_single(kind, PrefixTuningConfig(**PREFIX), tmp_path, eject=True, **overrides)
    config = json.loads((directory / "adapter_config.json").read_text())["config"]
    assert config["flat"] is False and adapter.prefix.length == 7


def test_safetensors_and_bare_model_keys(tmp_path):
    """adapter.safetensors is read; keys without the `transformer.` prefix load the same."""
    adapter, directory, ours = check_single("gpt2", DoubleSeqBnInvConfig(), tmp_path, safetensors=True)
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "adapter.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, directory / "adapter.safetensors")
    again = load_adapter(directory, ours.info)
    ids = random_ids(BATCH, SEQ)
    assert torch.equal(our_logits(ours, ids, [adapter]), our_logits(ours, ids, [again]))


# ----------------------------------------------------------------------------- stacks and generation


def test_madx_stack_matches_library(tmp_path):
    for kind in ("gpt2", "llama"):
        hf, ours, dirs = setup_case(kind, {"lang": SeqBnInvConfig(), "task": SeqBnConfig()}, tmp_path / kind)
        hf.set_active_adapters(Stack("lang", "task"))
        ids = random_ids(BATCH, SEQ)
        lib = library_logits(hf, ids)
        for name, d in dirs.items():
            hf.save_adapter(str(d), name)
        setup = [load_adapter(dirs["lang"], ours.info), load_adapter(dirs["task"], ours.info)]
        validate_stack(setup)
        assert_close(lib, our_logits(ours, ids, setup), our_logits(ours, ids, setup[:1]))


def test_mixed_stack_matches_library(tmp_path):
    """Stack(SeqBnInv, LoRA q, prefix, LoRA q, IA3) on Llama: NICE of the first, LoRA->LoRA on q_proj
    (in == out), prefix, IA3 on k/v/down after nothing else."""
    configs = {"inv": SeqBnInvConfig(), "la": LoRAConfig(r=4, alpha=8, attn_matrices=["q"]),
               "pre": PrefixTuningConfig(**PREFIX), "lb": LoRAConfig(r=2, alpha=2, attn_matrices=["q"]),
               "ia": IA3Config()}
    hf, ours, dirs = setup_case("llama", configs, tmp_path)
    hf.set_active_adapters(Stack(*configs))
    ids = random_ids(BATCH, SEQ)
    lib = library_logits(hf, ids)
    for name, d in dirs.items():
        hf.save_adapter(str(d), name)
    setup = [load_adapter(dirs[n], ours.info) for n in configs]
    validate_stack(setup)
    assert_close(lib, our_logits(ours, ids, setup), our_logits(ours, ids, []))


def greedy_ours(model, prompt: list[int], setup, steps: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(forward_sequences(model, [tokens], [tuple(setup)])[0][-1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("kind,config", [
    ("gpt2", lambda: DoubleSeqBnInvConfig()), ("llama", lambda: MAMConfig()),
    ("gpt2", lambda: VeraConfig(r=4, selfattn_lora=False, output_lora=True)),
    ("llama", lambda: DoRAConfig(r=4, alpha=4, attn_matrices=["q", "k", "v"])),
])
def test_greedy_continuation_matches_library(kind, config, tmp_path):
    hf, ours, dirs = setup_case(kind, {"ad": config()}, tmp_path)
    hf.set_active_adapters("ad")
    hf.save_adapter(str(dirs["ad"]), "ad")
    adapter = load_adapter(dirs["ad"], ours.info)
    prompt = random_ids(1, 5, seed=3)[0].tolist()
    expected = greedy_library(hf, prompt, 8)
    assert greedy_ours(ours, prompt, [adapter], 8) == expected


def test_mixed_batch_matches_each_adapter_alone(tmp_path):
    """One batched forward whose rows use different adapter types (and none), with different
    lengths, equals the library running each row's adapter alone."""
    configs = {"inv": SeqBnInvConfig(), "pre": PrefixTuningConfig(**PREFIX), "lora": LoRAConfig(r=4, alpha=8),
               "ia3": IA3Config(), "par": ParBnConfig(), "cpt": LoRAConfig(r=2, output_lora=True)}
    hf, ours, dirs = setup_case("llama", configs, tmp_path)
    loaded = {}
    for name, d in dirs.items():
        hf.save_adapter(str(d), name)
        loaded[name] = load_adapter(d, ours.info)
    rows = [(None, 9), ("inv", 7), ("pre", 9), ("lora", 5), ("ia3", 9), ("pre", 4), ("par", 8), ("cpt", 6)]
    ids = [random_ids(1, n, seed=i)[0] for i, (_, n) in enumerate(rows)]
    got = forward_sequences(ours, [t.tolist() for t in ids], [(loaded[n],) if n else () for n, _ in rows])
    for (name, _), t, logits in zip(rows, ids, got):
        hf.set_active_adapters(name)
        err = (library_logits(hf, t[None])[0] - logits).abs().max().item()
        assert err <= TOL, f"row with adapter {name}: max |Δlogit| = {err}"


def test_validate_stack_refusals(tmp_path):
    hf, ours, dirs = setup_case("llama", {"a": LoRAConfig(r=2), "b": LoRAConfig(r=2)}, tmp_path / "llama")
    for n, d in dirs.items():
        hf.save_adapter(str(d), n)
    a, b = (load_adapter(dirs[n], ours.info) for n in ("a", "b"))
    with pytest.raises(InvalidRequest, match="v_proj"):  # GQA: v_proj 64 -> 32, a stacked LoRA cannot read it
        validate_stack([a, b])
    peft = Adapter(name="p", format="peft", method="lora", config={})
    with pytest.raises(InvalidRequest, match="PEFT|peft"):
        validate_stack([a, peft])
    validate_stack([peft])  # alone it is fine

    hf, ours, dirs = setup_case("gpt2", {"l": LoRAConfig(r=2), "s": SeqBnConfig()}, tmp_path / "gpt2")
    for n, d in dirs.items():
        hf.save_adapter(str(d), n)
    lora, seq = (load_adapter(dirs[n], ours.info) for n in ("l", "s"))
    with pytest.raises(InvalidRequest, match="c_attn"):
        validate_stack([seq, lora])

    hf, ours, dirs = setup_case("llama", {"d": DoRAConfig(r=2, alpha=2, attn_matrices=["q"]), "q": LoRAConfig(r=2),
                                          "s": SeqBnConfig()}, tmp_path / "dora")
    for n, d in dirs.items():
        hf.save_adapter(str(d), n)
    dora, lora_q, seq = (load_adapter(dirs[n], ours.info) for n in ("d", "q", "s"))
    with pytest.raises(InvalidRequest, match="DoRA"):
        validate_stack([lora_q, dora])
    validate_stack([dora, seq])  # no shared linear: fine


# ----------------------------------------------------------------------------- refusals and broken files


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    """A GPT-2 SeqBn adapter directory and our model, for breaking copies of it."""
    tmp = tmp_path_factory.mktemp("saved")
    hf, ours, dirs = setup_case("gpt2", {"ad": SeqBnConfig()}, tmp)
    hf.save_adapter(str(dirs["ad"]), "ad")
    return dirs["ad"], ours


def broken_copy(saved, tmp_path, edit_config=None):
    import shutil

    directory = tmp_path / "broken"
    shutil.copytree(saved, directory)
    if edit_config:
        path = directory / "adapter_config.json"
        meta = json.loads(path.read_text())
        edit_config(meta)
        path.write_text(json.dumps(meta))
    return directory


def test_missing_files(saved_gpt2, tmp_path):
    saved, ours = saved_gpt2
    d = broken_copy(saved, tmp_path)
    (d / "pytorch_adapter.bin").unlink()
    with pytest.raises(AdapterFormatError, match="pytorch_adapter.bin"):
        load_adapter(d, ours.info)
    (d / "adapter_config.json").unlink()
    with pytest.raises(AdapterFormatError, match="adapter_config.json"):
        load_adapter(d, ours.info, format="adapterhub")


def test_bad_json(saved_gpt2, tmp_path):
    saved, ours = saved_gpt2
    d = broken_copy(saved, tmp_path)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        load_adapter(d, ours.info)


def test_wrong_tensor_shape(saved_gpt2, tmp_path):
    saved, ours = saved_gpt2
    d = broken_copy(saved, tmp_path)
    state = torch.load(d / "pytorch_adapter.bin", weights_only=True)
    key = next(k for k in state if k.endswith("adapter_up.weight"))
    state[key] = torch.zeros(64, 5)
    torch.save(state, d / "pytorch_adapter.bin")
    with pytest.raises(AdapterIncompatible, match=re.escape(key)):
        load_adapter(d, ours.info)


def test_unexpected_and_missing_tensors(saved_gpt2, tmp_path):
    saved, ours = saved_gpt2
    d = broken_copy(saved, tmp_path)
    state = torch.load(d / "pytorch_adapter.bin", weights_only=True)
    key = next(k for k in state if k.endswith("adapter_up.bias"))
    del state[key]
    torch.save(state, d / "pytorch_adapter.bin")
    with pytest.raises(AdapterFormatError, match="adapter_up.bias"):
        load_adapter(d, ours.info)
    state[key.replace("output_adapters", "attention_adapters")] = torch.zeros(64)
    torch.save(state, d / "pytorch_adapter.bin")
    with pytest.raises(AdapterFormatError, match="missing tensor|does not explain"):
        load_adapter(d, ours.info)


def test_wrong_model(saved_gpt2, tmp_path):
    saved, ours = saved_gpt2
    d = broken_copy(saved, tmp_path, lambda m: m.update(model_type="llama"))
    with pytest.raises(AdapterIncompatible, match="model_type 'llama'"):
        load_adapter(d, ours.info)
    with pytest.raises(AdapterIncompatible, match="hidden_size"):
        load_adapter(saved, ours_from(hf_model("gpt2", hidden=128)).info)
    with pytest.raises(AdapterIncompatible, match="layer 1"):
        load_adapter(saved, ours_from(hf_model("gpt2", n_layer=1)).info)


@pytest.mark.parametrize(
    "edit,error,match",
    [
        (lambda c: c.update(architecture="glow_flow"), AdapterUnsupported, "glow_flow"),
        # ReFT is served (tests/server/test_compose_http.py); one in half precision is not
        (lambda c: c.update(architecture="reft", r=2, prefix_positions=1, suffix_positions=0, dtype="bfloat16"),
         AdapterUnsupported, "bfloat16"),
        (lambda c: c.update(inv_adapter="glow", inv_adapter_reduction_factor=2), AdapterUnsupported, "glow"),
        (lambda c: c.update(residual_before_ln="post_add"), AdapterUnsupported, "post_add"),
        (lambda c: c.update(scaling="bogus"), AdapterUnsupported, "bogus"),
        (lambda c: c.update(non_linearity="nope"), AdapterUnsupported, "nope"),
    ],
)
def test_unsupported_options(saved_gpt2, tmp_path, edit, error, match):
    saved, ours = saved_gpt2
    d = broken_copy(saved, tmp_path, lambda m: edit(m["config"]))
    with pytest.raises(error, match=match):
        load_adapter(d, ours.info)


@pytest.mark.parametrize("kind,config,match", [
    # the library's DoRA divides by ||W + B A|| but adds s (x A^T) B^T: only s == 1 is PEFT's form
    ("llama", lambda: DoRAConfig(r=4, alpha=8), "alpha"),
    # VeRA's shared A/B fit the first adapted layer only; q (64->64) and GQA v (64->32) differ
    ("llama", lambda: VeraConfig(r=4), "differ in shape"),
    ("gpt2", lambda: VeraConfig(r=4, selfattn_lora=False, intermediate_lora=True, output_lora=True), "differ in shape"),
])
def test_variants_the_library_cannot_run_or_we_cannot_serve(kind, config, match, tmp_path):
    """Saved by the library (its forward then fails, or computes a form we do not): 422."""
    hf, ours, dirs = setup_case(kind, {"v": config()}, tmp_path)
    hf.save_adapter(str(dirs["v"]), "v")
    with pytest.raises(AdapterUnsupported, match=match):
        load_adapter(dirs["v"], ours.info)


@pytest.mark.parametrize("kind,edit,match", [
    ("gpt2", lambda c: c.update(vera_d=0.1, vera_b=0.0), "c_attn"),  # the library's forward raises there
    ("gpt2", lambda c: c.update(architecture="mtl_lora"), "c_attn"),
    ("gpt2", lambda c: c.update(use_dora=True), "GPT-2"),  # the library cannot build it
    ("llama", lambda c: c.update(architecture="mtl_lora", task_specific_matrix_type="linear"), "linear"),
    ("llama", lambda c: c.update(architecture="mtl_lora", use_dora=True), "MTL-LoRA"),
    ("llama", lambda c: c.update(use_dora=True, use_gating=True), "gated DoRA"),
    ("llama", lambda c: c.update(composition_mode="scale", r=1, use_dora=True), "IA3"),
])
def test_lora_variants_refused(kind, edit, match, tmp_path):
    """Configs the library cannot build or run, edited into a saved LoRA: 422 naming why."""
    hf, ours, dirs = setup_case(kind, {"l": LoRAConfig(r=2, alpha=2)}, tmp_path)
    hf.save_adapter(str(dirs["l"]), "l")
    d = broken_copy(dirs["l"], tmp_path, lambda m: edit(m["config"]))
    with pytest.raises(AdapterUnsupported, match=match):
        load_adapter(d, ours.info)


def test_gated_prefix_refused(tmp_path):
    hf, ours, dirs = setup_case("gpt2", {"u": UniPELTConfig()}, tmp_path)
    hf.save_adapter(str(dirs["u"]), "u")
    with pytest.raises(AdapterUnsupported, match="use_gating"):
        load_adapter(dirs["u"], ours.info)


def test_prompt_tuning_refused(saved_gpt2, tmp_path):
    saved, ours = saved_gpt2
    config = {"architecture": "prompt_tuning", "combine": "prefix", "init_weights_seed": None,
              "prompt_init": "random_uniform", "prompt_init_text": None, "prompt_length": 10}
    d = broken_copy(saved, tmp_path, lambda m: m.update(config=config))
    torch.save({"transformer.prompt_tuning.prompt_tunings.ad.prompt_embedding.weight": torch.zeros(10, 64)},
               d / "pytorch_adapter.bin")
    with pytest.raises(AdapterUnsupported, match="prompt tuning"):
        load_adapter(d, ours.info)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned_by_adapter_pickle",))


def test_pickle_with_code_refused(saved_gpt2, tmp_path, monkeypatch):
    saved, ours = saved_gpt2
    monkeypatch.chdir(tmp_path)
    d = broken_copy(saved, tmp_path)
    torch.save({"transformer.h.0.output_adapters.adapters.ad.adapter_up.bias": _Evil()}, d / "pytorch_adapter.bin")
    with pytest.raises(AdapterFormatError, match="refused"):
        load_adapter(d, ours.info)
    assert not (tmp_path / "pwned_by_adapter_pickle").exists()


def test_legacy_config_fixes(saved_gpt2, tmp_path):
    """No `version`: gelu means gelu_new; adapters < 1.1.0 LoRA with r != alpha runs with alpha = r."""
    saved, ours = saved_gpt2

    def legacy(meta):
        del meta["version"]
        meta["config"]["non_linearity"] = "gelu"

    adapter = load_adapter(broken_copy(saved, tmp_path / "a", legacy), ours.info)
    assert all(b.activation == "gelu_new" for b in adapter.bottleneck.values())

    hf, ours_l, dirs = setup_case("llama", {"l": LoRAConfig(r=2, alpha=8)}, tmp_path / "l")
    hf.save_adapter(str(dirs["l"]), "l")
    old = load_adapter(broken_copy(dirs["l"], tmp_path / "b", lambda m: m.update(version="adapters.1.0.1")), ours_l.info)
    assert all(e.scale == 1.0 for e in old.linear.values())
    assert all(e.scale == 4.0 for e in load_adapter(dirs["l"], ours_l.info).linear.values())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_flex_head_model_applies_the_inverse_before_its_head(kind, tmp_path):
    """A MAD-X language adapter trained in a flex-head `*AdapterModel` with a causal-LM head:
    the library applies the head's layers, then the NICE inverse, then the tied projection with
    the head's bias. Ours must match, and the store must keep the head."""
    from adapters import AutoAdapterModel

    from adapter_runtime.store import AdapterStore

    plain = hf_model(kind)
    ours = ours_from(plain)
    flex = AutoAdapterModel.from_config(copy.deepcopy(plain.config))
    base_state = {k.removeprefix("transformer.").removeprefix("model."): v for k, v in plain.state_dict().items()}
    flex.base_model.load_state_dict({k: v for k, v in base_state.items() if not k.startswith("lm_head")}, strict=False)
    flex.add_adapter("inv", config=SeqBnInvConfig(reduction_factor=16))
    flex.add_causal_lm_head("inv")  # 2 layers: Linear, gelu, LayerNorm, then the tied projection (+ bias)
    randomize_adapter(flex, "inv", 0.5)  # the adapter and its head's layers and bias ...
    with torch.no_grad():  # ... but not the projection weight: it is the base's embedding matrix
        flex.get_output_embeddings().weight.copy_(plain.get_output_embeddings().weight)
    flex.set_active_adapters("inv")
    flex.active_head = "inv"
    flex.eval()
    ids = random_ids(BATCH, SEQ)
    with torch.no_grad():
        lib = flex(ids, use_cache=False).logits
    flex.save_adapter(str(tmp_path / "inv"), "inv")
    adapter = load_adapter(tmp_path / "inv", ours.info)
    assert adapter.head is not None and adapter.invertible is not None
    base = our_logits(ours, ids, ())
    assert_close(lib, our_logits(ours, ids, (adapter,)), base)

    store = AdapterStore(tmp_path / "store", ours.info)  # the store keeps the head
    store.add("inv", tmp_path / "inv")
    assert_close(lib, our_logits(ours, ids, (load_adapter(store.path("inv"), ours.info),)), base)
