"""Composition blocks (Fuse, Average, Parallel, BatchSplit, MultiTask, nested in Stacks) against
the `adapters` 1.3.0 library, on GPT-2 and GQA Llama.

The adapters and the fusion layers are made and randomized by the library (every parameter,
fusion query/key/value included), saved, and the reference is a fresh library model that
loaded those files back (what a server sees). Our rows come from the registry exactly as a
request's rows do (composition.request_rows -> registry.resolve), and run through one packed
forward: each row must give the library's logits for its rows of the library's batch
(Parallel: channel-major) within 1e-4, and every case first proves it changes the logits.
"""

from __future__ import annotations

import re

import pytest
import torch

adapters_lib = pytest.importorskip("adapters")
from adapters import (DoubleSeqBnConfig, IA3Config, LoRAConfig, ParBnConfig, PrefixTuningConfig,  # noqa: E402
                      SeqBnConfig, SeqBnInvConfig)
from adapters.composition import Average, BatchSplit, Fuse, MultiTask, Parallel, Stack  # noqa: E402

from adapter_runtime.composition import request_rows  # noqa: E402
from adapter_runtime.engine import Engine, EngineConfig, Request  # noqa: E402
from adapter_runtime.errors import InvalidRequest  # noqa: E402
from adapter_runtime.formats import load_adapter  # noqa: E402
from tests.support.packed import forward_sequences  # noqa: E402
from adapter_runtime.methods.compose import Composed  # noqa: E402
from adapter_runtime.models import load_model  # noqa: E402
from adapter_runtime.registry import AdapterRegistry  # noqa: E402
from adapter_runtime.sampling import SamplingParams  # noqa: E402
from tests.support.oracles import greedy_library  # noqa: E402
from tests.support.tiny import hf_model, random_ids, save_checkpoint  # noqa: E402

TOL = 1e-4
SEQ = 7


def lora_mlp(r):  # LoRA on the MLP only: GPT-2's fused c_attn refuses every composition block
    return LoRAConfig(r=r, alpha=2 * r, selfattn_lora=False, intermediate_lora=True, output_lora=True)


ADAPTERS = {
    "a": lambda: SeqBnConfig(reduction_factor=8),
    "b": lambda: SeqBnConfig(reduction_factor=16, non_linearity="gelu"),
    "c": lambda: SeqBnConfig(reduction_factor=8, original_ln_before=False, residual_before_ln=False),
    "lang": lambda: SeqBnInvConfig(reduction_factor=8),
    "hou": lambda: DoubleSeqBnConfig(reduction_factor=8),
    "hou2": lambda: DoubleSeqBnConfig(reduction_factor=16),
    "par": lambda: ParBnConfig(reduction_factor=8),
    "l1": lambda: lora_mlp(4),
    "l2": lambda: lora_mlp(2),
    "i3": lambda: IA3Config(selfattn_lora=False, intermediate_lora=True, output_lora=True),
    "p5": lambda: PrefixTuningConfig(prefix_length=5, bottleneck_size=16),
    "p5b": lambda: PrefixTuningConfig(prefix_length=5, bottleneck_size=8),
    "p7": lambda: PrefixTuningConfig(prefix_length=7, bottleneck_size=16),
}
FUSIONS = {  # name -> (fused adapters, fusion config): every flag of the forward exercised
    "fus": (["a", "b", "c"], "dynamic"),
    "fus-static": (["a", "b"], "static"),
    "fus-flags": (["b", "a", "c"], dict(key=True, query=False, value=True, query_before_ln=True, regularization=False,
                                         residual_before=True, temperature=False, value_before_softmax=False,
                                         value_initialized=False, dropout_prob=None)),
    "fus-hou": (["hou", "hou2"], "dynamic"),
}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def world(request, tmp_path_factory):
    """(kind, the reloaded library model, our model, a registry holding every adapter and fusion)."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"compose-{kind}")
    hf = hf_model(kind)
    ckpt = save_checkpoint(hf_model(kind), root / "base")
    adapters_lib.init(hf)
    for i, (name, config) in enumerate(ADAPTERS.items()):
        hf.add_adapter(name, config=config())
        randomize(hf, rf"\.{re.escape(name)}\.", seed=i + 1)
        hf.save_adapter(str(root / name), name)
    for i, (name, (fused, config)) in enumerate(FUSIONS.items()):
        hf.add_adapter_fusion(Fuse(*fused, name=name), config=config)
        randomize(hf, rf"adapter_fusion_layer\.{re.escape(name)}\.", seed=100 + i, scale=0.3)
        (root / name).mkdir()
        hf.save_adapter_fusion(str(root / name), name)
    oracle = hf_model(kind)  # what the library makes of the saved files
    adapters_lib.init(oracle)
    for name in ADAPTERS:
        oracle.load_adapter(str(root / name), load_as=name)
    for name in FUSIONS:
        oracle.load_adapter_fusion(str(root / name), load_as=name)
    ours = load_model(ckpt)
    registry = AdapterRegistry(ours.name)
    for name in [*ADAPTERS, *FUSIONS]:
        registry.register(name, load_adapter(root / name, ours.info, name))
    return kind, oracle.eval(), ours, registry


def randomize(hf, pattern: str, seed: int, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if re.search(pattern, name):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def library_logits(oracle, setup, ids, **kwargs) -> torch.Tensor:
    oracle.set_active_adapters(setup)
    try:
        with torch.no_grad():
            return oracle(ids, use_cache=False, **kwargs).logits
    finally:
        oracle.set_active_adapters(None)


def our_rows(world, spec, ids) -> list[list]:
    """Per prompt, the setups of its rows, as the server resolves a request."""
    _, _, _, registry = world
    return [[registry.resolve(registry.base_name, row) for row in rows] for rows in request_rows(spec, ids.shape[0])]


def our_logits(world, spec, ids) -> torch.Tensor:
    """[rows, S, V] in the library's order: channel-major for Parallel."""
    _, _, ours, _ = world
    rows = our_rows(world, spec, ids)
    flat = [(c, i, setup) for i, setups in enumerate(rows) for c, setup in enumerate(setups)]
    logits = forward_sequences(ours.model, [ids[i].tolist() for _, i, _ in flat], [s for _, _, s in flat])
    order = sorted(range(len(flat)), key=lambda k: (flat[k][0], flat[k][1]))
    return torch.stack([logits[k] for k in order])


# (library setup, our request's `adapters`, batch, kwargs of the library call, model families)
CASES = {
    "fuse": (lambda: Fuse("a", "b", "c", name="fus"), {"fuse": ["a", "b", "c"]}, 2, {}, None),
    "fuse-by-name": (lambda: Fuse("b", "a", "c", name="fus-flags"), {"fuse": ["b", "a", "c"], "name": "fus-flags"},
                     2, {}, None),
    "fuse-static": (lambda: Fuse("a", "b", name="fus-static"), {"fuse": ["a", "b"]}, 2, {}, None),
    "fuse-houlsby-two-locations": (lambda: Fuse("hou", "hou2", name="fus-hou"), ["fus-hou"], 2, {}, None),
    "stack-lang-fuse": (lambda: Stack("lang", Fuse("a", "b", "c", name="fus")), ["lang", "fus"], 2, {}, None),
    "stack-lang-fuse-block": (lambda: Stack("lang", Fuse("a", "b", "c", name="fus")),
                              {"stack": ["lang", {"fuse": ["a", "b", "c"]}]}, 2, {}, None),
    "fuse-of-stacks": (lambda: Fuse(Stack("lang", "a"), "b", "c", name="fus"),
                       {"fuse": [{"stack": ["lang", "a"]}, "b", "c"], "name": "fus"}, 2, {}, None),
    "average": (lambda: Average("a", "b"), {"average": ["a", "b"]}, 2, {}, None),
    "average-weights": (lambda: Average("a", "b", "c", weights=[0.2, 0.5, 1.3]),
                        {"average": ["a", "b", "c"], "weights": [0.2, 0.5, 1.3]}, 2, {}, None),
    "average-unnormalized": (lambda: Average("a", "c", weights=[0.7, -0.4], normalize_weights=False),
                             {"average": ["a", "c"], "weights": [0.7, -0.4], "normalize_weights": False}, 2, {}, None),
    "average-houlsby-one-location": (lambda: Average("hou", "a"), {"average": ["hou", "a"]}, 2, {}, None),
    "average-lora": (lambda: Average("l1", "l2", weights=[2, 1]), {"average": ["l1", "l2"], "weights": [2, 1]}, 2, {},
                     None),
    "average-ia3": (lambda: Average("i3", "i3", weights=[1, 3]), {"average": ["i3", "i3"], "weights": [1, 3]}, 2, {},
                    None),
    "stack-average-nested": (lambda: Stack("lang", Average(Stack("a", "b"), "c")),
                             {"stack": ["lang", {"average": [{"stack": ["a", "b"]}, "c"]}]}, 2, {}, None),
    "stack-average-lora-ia3": (lambda: Stack(Average("l1", "l2"), "i3"),
                               {"stack": [{"average": ["l1", "l2"]}, "i3"]}, 2, {}, None),
    "parallel": (lambda: Parallel("a", "b", "c"), {"parallel": ["a", "b", "c"]}, 2, {}, None),
    "parallel-stacks": (lambda: Parallel(Stack("a", "b"), Stack("c", "lang")),
                        {"parallel": [{"stack": ["a", "b"]}, {"stack": ["c", "lang"]}]}, 2, {}, None),
    "stack-parallel": (lambda: Stack("lang", Parallel("a", "b")), {"stack": ["lang", {"parallel": ["a", "b"]}]}, 2, {},
                       None),
    "parallel-pairs": (lambda: Stack(Parallel("a", "b"), Parallel("c", "a")),
                       {"stack": [{"parallel": ["a", "b"]}, {"parallel": ["c", "a"]}]}, 2, {}, None),
    "parallel-parbn": (lambda: Parallel("par", "par"), {"parallel": ["par", "par"]}, 1, {}, None),
    "parallel-lora": (lambda: Parallel("l1", "l2"), {"parallel": ["l1", "l2"]}, 1, {}, None),
    "parallel-prefix": (lambda: Parallel("p5", "p5b"), {"parallel": ["p5", "p5b"]}, 2, {}, None),
    "parallel-batchsplit": (lambda: Parallel("a", BatchSplit("b", "c", batch_sizes=[2, 1])),
                            {"parallel": ["a", {"batch_split": ["b", "c"], "batch_sizes": [2, 1]}]}, 3, {}, None),
    "batchsplit": (lambda: BatchSplit("a", "c", batch_sizes=[1, 2]), {"batch_split": ["a", "c"], "batch_sizes": [1, 2]},
                   3, {}, None),
    "batchsplit-stack-parbn": (lambda: BatchSplit(Stack("a", "b"), "par", batch_sizes=[1, 1]),
                               {"batch_split": [{"stack": ["a", "b"]}, "par"], "batch_sizes": [1, 1]}, 2, {}, None),
    "multitask": (lambda: MultiTask("a", "b"), {"multi_task": ["a", "b"], "task_ids": [1, 0]}, 2,
                  {"task_ids": torch.tensor([1, 0])}, None),
    "multitask-lora": (lambda: MultiTask("l1", "l2"), {"multi_task": ["l1", "l2"], "task_ids": ["l2", "l1"]}, 2,
                       {"task_ids": torch.tensor([1, 0])}, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_composition_matches_library(world, case):
    kind, oracle, ours, _ = world
    setup, spec, batch, kwargs, kinds = CASES[case]
    ids = random_ids(batch, SEQ, seed=3)
    lib = library_logits(oracle, setup(), ids, **kwargs)
    got = our_logits(world, spec, ids)
    base = torch.stack(forward_sequences(ours.model, ids.tolist())).repeat(lib.shape[0] // batch, 1, 1)
    assert (lib - base).abs().max() > 1e-2, "the composition has no effect: the comparison proves nothing"
    assert (lib - got).abs().max() <= TOL, f"max |Δlogit| = {(lib - got).abs().max():.2e}"


def test_parallel_prefixes_of_different_lengths_run_each_channel_alone(world):
    """The library pads the shorter prefix with attended constant keys (reference §7.4, a bug);
    here each channel is its prefix adapter alone (README: deviations)."""
    _, _, ours, registry = world
    ids = random_ids(2, SEQ)
    alone = [torch.stack(forward_sequences(ours.model, ids.tolist(), [registry.resolve(n)] * 2)) for n in ("p5", "p7")]
    assert torch.equal(our_logits(world, {"parallel": ["p5", "p7"]}, ids), torch.cat(alone))


def test_composed_rows_take_the_side_path_unless_a_plain_stack_is_exact(world):
    ids = random_ids(2, SEQ)
    assert all(type(s) is tuple and len(s) == 1 for rows in our_rows(world, {"parallel": ["a", "b"]}, ids) for s in rows)
    # channel 0 is `a` alone exactly; channel 1 runs `c` with `a`'s pre-processing (the
    # library's split rule), which no plain stack computes
    for first, second in our_rows(world, {"parallel": ["a", "c"]}, ids):
        assert type(first) is tuple and len(first) == 1 and isinstance(second, Composed)
    assert all(isinstance(s, Composed) for rows in our_rows(world, {"fuse": ["a", "b", "c"]}, ids) for s in rows)


REFUSED = {
    "unknown name": ({"parallel": ["nope", "a"]}, "'nope' not found"),
    "fuse of non-bottlenecks": ({"fuse": ["a", "l1"], "name": "fus"}, "fuses bottleneck adapters only"),
    "fuse without a stored fusion": ({"fuse": ["a", "b", "hou"]}, "no AdapterFusion of adapters"),
    "fusion name not a fusion": ({"fuse": ["a", "b"], "name": "a"}, "is not an AdapterFusion"),
    "weights sum to zero": ({"average": ["a", "b"], "weights": [1, -1]}, "sum to 0"),
    "weights count": ({"average": ["a", "b"], "weights": [1]}, "one finite number for each"),
    "stack in stack": ({"stack": ["a", {"stack": ["b", "c"]}]}, "Stack cannot hold Stack"),
    "parallel in average": ({"average": [{"parallel": ["a", "b"]}, "c"]}, "Average cannot hold Parallel"),
    "too deep": ({"parallel": [{"stack": ["a", {"parallel": ["b", "c"]}]}, "a"]}, "too deep"),
    "first leaf absent": ({"average": ["l1", "a"]}, "has no bottleneck"),
    "children at different places": ({"batch_split": ["a", "hou"], "batch_sizes": [1, 1]}, "first adapter 'a' has no"),
    "split children differ": ({"parallel": ["l1", "i3"]}, "mixes LoRA and (IA)^3"),
    "prefix in average": ({"average": ["p5", "p7"]}, "cannot average prefixes"),
    "batch sizes": ({"batch_split": ["a", "b"], "batch_sizes": [2, 1]}, "sum to 3"),
    "task ids": ({"multi_task": ["a", "b"], "task_ids": [0, 2]}, "not a child"),
    "two keys": ({"fuse": ["a"], "average": ["b"]}, "exactly one block key"),
    "unknown option": ({"parallel": ["a", "b"], "weights": [1, 2]}, "does not take 'weights'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_compositions_are_refused_naming_the_problem(world, case):
    spec, message = REFUSED[case]
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        our_rows(world, spec, random_ids(2, SEQ))


def test_greedy_continuations_and_mixed_batch(world):
    """Engine rows (chunked, decoding with the KV cache) of compositions, mixed with banked rows
    in one batch, equal the library's greedy loop and each request alone."""
    kind, oracle, ours, registry = world
    engine = Engine(ours, registry=registry, config=EngineConfig(max_batch=16, max_seq_len=48))
    cases = [(Fuse("a", "b", "c", name="fus"), {"fuse": ["a", "b", "c"]}), (Average("l1", "l2"), {"average": ["l1", "l2"]}),
             (Stack("lang", Fuse("a", "b", "c", name="fus")), ["lang", "fus"]), ("a", None), ("l1", None), (None, None)]
    prompts = [random_ids(1, 5 + i, seed=i)[0].tolist() for i in range(len(cases))]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    def request(i):
        lib, spec = cases[i]
        if spec is None:
            setup = registry.resolve(lib) if lib else ()
        else:
            setup = registry.resolve(registry.base_name, request_rows(spec, 1)[0][0])
        return Request(tuple(prompts[i]), params, setup)

    with engine:
        together = [h.result(120).token_ids for h in [engine.submit(request(i)) for i in range(len(cases))]]
        alone = [engine.submit(request(i)).result(120).token_ids for i in range(len(cases))]
    assert together == alone
    for i, (lib, _) in enumerate(cases):
        oracle.set_active_adapters(lib)
        try:
            assert list(together[i]) == greedy_library(oracle, prompts[i], 6), i
        finally:
            oracle.set_active_adapters(None)
