"""One engine batch with a row per adapter method of both libraries plus base rows: every
row's greedy continuation equals the library's own, and equals what it gives alone."""

from __future__ import annotations

import pytest
import torch

from adapter_runtime.engine import Engine, EngineConfig, Request
from adapter_runtime.formats import load_adapter
from adapter_runtime.models import load_model
from adapter_runtime.sampling import SamplingParams
from tests.support.oracles import adapterhub_adapter, greedy_library, peft_adapter
from tests.support.tiny import hf_model, random_ids, save_checkpoint

pytest.importorskip("adapters")
pytest.importorskip("peft")
from adapters import (AdapterPlusConfig, CompacterPlusPlusConfig, DoRAConfig as HubDoRA, DoubleSeqBnConfig,  # noqa: E402
                      IA3Config as HubIA3, LoRAConfig as HubLoRA, LoReftConfig, MTLLoRAConfig, NoReftConfig, ParBnConfig,
                      PrefixTuningConfig as HubPrefix, SeqBnConfig, SeqBnInvConfig, VeraConfig as HubVera)
from peft import (AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PrefixTuningConfig,  # noqa: E402
                  PromptTuningConfig, VeraConfig)

HIDDEN = 128  # Compacter needs hidden / reduction_factor divisible by phm_dim
STEPS = 8

CASES = {
    "peft-lora": ("peft", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])),
    "peft-dora": ("peft", lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"])),
    "peft-ia3": ("peft", lambda: IA3Config()),
    "peft-prompt": ("peft", lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    "peft-prefix": ("peft", lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "peft-vera": ("peft", lambda: VeraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "peft-loha": ("peft", lambda: LoHaConfig(r=3, alpha=6, target_modules=["k_proj", "up_proj"])),
    "peft-lokr": ("peft", lambda: LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "o_proj"])),
    "peft-adalora": ("peft", lambda: AdaLoraConfig(init_r=4, total_step=10, target_modules=["v_proj", "gate_proj"])),
    "hub-pfeiffer": ("hub", lambda: SeqBnConfig(reduction_factor=16)),
    "hub-houlsby": ("hub", lambda: DoubleSeqBnConfig(reduction_factor=16)),
    "hub-parallel": ("hub", lambda: ParBnConfig(reduction_factor=8)),
    "hub-compacter++": ("hub", lambda: CompacterPlusPlusConfig()),
    "hub-invertible": ("hub", lambda: SeqBnInvConfig(reduction_factor=16)),
    "hub-prefix": ("hub", lambda: HubPrefix(prefix_length=5, bottleneck_size=32)),
    "hub-prefix-leave-out": ("hub", lambda: HubPrefix(prefix_length=4, bottleneck_size=32, leave_out=[1])),
    "hub-lora": ("hub", lambda: HubLoRA(r=4, alpha=8, intermediate_lora=True)),
    "hub-ia3": ("hub", lambda: HubIA3()),
    "hub-vera": ("hub", lambda: HubVera(r=4, attn_matrices=["q"])),
    "hub-dora": ("hub", lambda: HubDoRA(r=4, alpha=4)),
    "hub-mtl-lora": ("hub", lambda: MTLLoRAConfig(r=4, n_up_projection=2, output_lora=True)),
    "hub-adapter-plus": ("hub", lambda: AdapterPlusConfig(reduction_factor=16, stochastic_depth=0.0)),
    "hub-loreft": ("hub", lambda: LoReftConfig(r=4, prefix_positions=2, suffix_positions=2)),
    "hub-noreft": ("hub", lambda: NoReftConfig(r=2, prefix_positions=1, suffix_positions=3, tied_weights=True)),
}
# LoReFT: torch's orthogonal map of many random `original` matrices is exactly zero (then the
# intervention is the identity); these weights give a projection that changes the output
HUB_WEIGHTS = {"hub-loreft": {"seed": 2, "scale": 1.0}}
# compositions (Fuse, Average, Parallel, BatchSplit, a Stack around a Fuse) share batches with
# banked rows in tests/runtime/test_compose.py and tests/server/test_compose_http.py


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(our loaded model, {case: (adapter, library model)})."""
    root = tmp_path_factory.mktemp("mixed")
    lm = load_model(save_checkpoint(hf_model("llama", hidden=HIDDEN), root / "base"))
    made = {}
    for i, (case, (lib, config)) in enumerate(CASES.items()):
        directory = root / case
        if lib == "peft":
            is_ia3 = case == "peft-ia3"
            _, oracle = peft_adapter("llama", config(), directory, seed=i + 1, ia3=is_ia3, hidden=HIDDEN)
        else:
            _, oracle = adapterhub_adapter("llama", config(), directory, hidden=HIDDEN, **HUB_WEIGHTS.get(case, {"seed": i + 1}))
        made[case] = (load_adapter(directory, lm.info, case), oracle.eval())
    return lm, made


def test_mixed_batch_rows_equal_library_and_single_requests(world):
    lm, made = world
    engine = Engine(lm, config=EngineConfig(max_batch=32, max_seq_len=64))
    names = list(made) + [None, None]  # two base rows
    prompts = random_ids(len(names), 7, seed=4).tolist()
    prompts[-1] = prompts[-1][:4]  # rows of different lengths
    for case, (adapter, _) in made.items():
        engine.registry.register(case, adapter)

    def request(i):
        setup = () if names[i] is None else engine.registry.resolve(names[i])
        return Request(tuple(prompts[i]), SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True), setup)

    with engine:
        together = [h.result(120).token_ids for h in [engine.submit(request(i)) for i in range(len(names))]]
        alone = [engine.submit(request(i)).result(120).token_ids for i in range(len(names))]

    assert together == alone
    base = hf_model("llama", hidden=HIDDEN)  # the oracles' base model, without adapters
    for i, case in enumerate(names):
        if case is None:
            continue
        # every adapter row changes the base model's continuation: else its row proves nothing
        assert greedy_library(base, prompts[i], STEPS) != list(together[i]), case
        oracle = made[case][1]
        if case.startswith("peft"):
            with torch.no_grad():
                ids = torch.tensor([prompts[i]])
                expected = oracle.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS,
                                           do_sample=False, eos_token_id=None, pad_token_id=0)[0, -STEPS:].tolist()
        else:
            expected = greedy_library(oracle, prompts[i], STEPS)
        assert list(together[i]) == expected, case
