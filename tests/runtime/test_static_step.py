"""The static decode step (rows padded to a bucket, adapters read from the banks by slot index,
compiled with torch.compile) against the eager per-row reference: every row alone through
`forward_sequences` without banks, i.e. the reference math of methods/ one row at a time.
One adapter per banked method and variant, prefix and prompt tuning, side-path setups (a
stack, a gated adapter) and base rows, all in one batch."""

from __future__ import annotations

import pytest
import torch

from adapter_runtime.adapters import Adapter, Bottleneck, Invertible, LoRA, Prefix, Prompt, Scale
from adapter_runtime.engine import Engine, EngineConfig, Request
from tests.support.packed import forward_sequences
from adapter_runtime.models import load_model
from adapter_runtime.sampling import SamplingParams
from tests.support.tiny import hf_model, random_ids, save_checkpoint

STEPS = 6


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(save_checkpoint(hf_model("llama"), tmp_path_factory.mktemp("static")))


def make_adapters(info) -> dict[str, Adapter]:
    g = torch.Generator().manual_seed(5)
    rand = lambda *shape, s=0.3: torch.randn(*shape, generator=g) * s  # noqa: E731
    H, L = info.hidden_size, info.num_layers
    shapes = info.linear_shapes

    def lora(module, r):
        n_in, n_out = shapes[module]
        return LoRA(rand(r, n_in), rand(n_out, r), 0.5 * r)

    def bn(act, d, **kw):
        return Bottleneck(rand(d, H), rand(d), rand(H, d), rand(H), act, kw.pop("scaling", 0.8), **kw)

    def inv(width):
        h = H // 2
        return Invertible(rand(width, h), rand(width), rand(h, width), rand(h), rand(width, h), rand(width),
                          rand(h, width), rand(h), "relu")

    def kv(n, layers):
        return {layer: rand(info.num_kv_heads, n, info.head_dim) for layer in layers}

    def make(name, **parts):
        return Adapter(name, "test", name, {}, **parts)

    every_layer = range(L)
    return {
        "lora": make("lora", linear={(0, "self_attn.q_proj"): lora("self_attn.q_proj", 4),
                                     (1, "self_attn.v_proj"): lora("self_attn.v_proj", 2),
                                     (1, "mlp.down_proj"): lora("mlp.down_proj", 8)}),
        "lora-o": make("lora-o", linear={(i, "self_attn.o_proj"): lora("self_attn.o_proj", 3) for i in every_layer}),
        "ia3": make("ia3", linear={(0, "self_attn.k_proj"): Scale(1 + rand(shapes["self_attn.k_proj"][1])),
                                   (1, "mlp.down_proj"): Scale(1 + rand(shapes["mlp.down_proj"][0]), on_input=True)}),
        "ia3-in-qkv": make("ia3-in-qkv", linear={(1, "self_attn.q_proj"): Scale(1 + rand(H), on_input=True)}),
        "pfeiffer": make("pfeiffer", bottleneck={(i, "ffn"): bn("relu", 8) for i in every_layer}),
        "houlsby": make("houlsby", bottleneck={(i, loc): bn("swish", 4, original_ln_before=False)
                                               for i in every_layer for loc in ("attn", "ffn")}),
        "parallel-ln": make("parallel-ln", bottleneck={(0, "ffn"): bn(
            "relu", 6, is_parallel=True, ln_after=(1 + rand(H), rand(H)), ln_before=(1 + rand(H), rand(H)))}),
        "channel": make("channel", bottleneck={(1, "attn"): bn("gelu", 5, scaling=rand(H), residual_before_ln=False,
                                                                adapter_residual_before_ln=True)}),
        "madx": make("madx", bottleneck={(i, "ffn"): bn("relu", 8) for i in every_layer}, invertible=inv(6)),
        "prefix": make("prefix", prefix=Prefix(kv(3, every_layer), kv(3, every_layer), 3, shifts_positions=True)),
        "prefix-leave-out": make("prefix-leave-out", prefix=Prefix(kv(2, [0]), kv(2, [0]), 2, shifts_positions=False)),
        "prompt": make("prompt", prompt=Prompt(rand(3, H))),
        "gated": make("gated", bottleneck={(0, "ffn"): bn("relu", 4, gate=(rand(1, H), rand(1)))}),
    }


def test_static_compiled_step_equals_eager_per_row_reference(loaded):
    adapters = make_adapters(loaded.info)
    setups = [(a,) for a in adapters.values()] + [(adapters["madx"], adapters["pfeiffer"]), (), ()]
    names = [*adapters, "stack", "base", "base"]
    prompts = random_ids(len(setups), 5, seed=3).tolist()
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, logprobs=0, ignore_eos=True)

    def run(compile: bool, rows):
        engine = Engine(loaded, config=EngineConfig(max_batch=16, max_seq_len=48, compile=compile))
        engine.runner.compile_in_background = False  # the first step of the variant waits for its compile
        with engine:
            out = [h.result(600) for h in [engine.submit(Request(tuple(prompts[b]), params, setups[b])) for b in rows]]
        assert engine.runner.steps["compiled" if compile else "eager"] >= STEPS - 1
        return out

    static_rows = [b for b, n in enumerate(names) if n not in ("gated", "stack")]  # every row banked: static steps
    compiled = run(True, static_rows)
    eager = run(False, range(len(setups)))  # side-path rows in the batch: eager steps
    for b, c in zip(static_rows, compiled):
        assert c.token_ids == eager[b].token_ids, names[b]
    for b, c in enumerate(eager):
        if names[b] == "gated":  # its gate averages over each forward's tokens: not one full forward
            continue
        ref = forward_sequences(loaded.model, [prompts[b] + list(c.token_ids)], [setups[b]])[0]
        want = torch.log_softmax(ref.float(), -1)[torch.arange(4, 4 + STEPS), torch.tensor(c.token_ids)]
        assert torch.allclose(torch.tensor([e.logprob for e in c.logprobs]), want, atol=1e-4), names[b]
        assert list(c.token_ids) == ref[4:-1].argmax(-1).tolist(), names[b]
    for b, c in zip(static_rows, compiled):
        got = torch.tensor([e.logprob for e in c.logprobs])
        assert torch.allclose(got, torch.tensor([e.logprob for e in eager[b].logprobs]), atol=1e-4), names[b]
    base = forward_sequences(loaded.model, [prompts[-1] + list(eager[-1].token_ids)])[0]
    for name in ("lora", "pfeiffer", "madx", "prefix", "prompt"):  # the adapters change the output
        ref = forward_sequences(loaded.model, [prompts[-1] + list(eager[-1].token_ids)], [(adapters[name],)])[0]
        assert (ref[-STEPS:] - base[-STEPS:]).abs().max() > 1e-2, name


def test_a_compiling_engine_keeps_its_start_up_objects_out_of_full_collections(loaded):
    """With compile on (the server), start freezes the objects alive then (model, compile
    caches: a full collection scanning them stalls a step for up to a second); stop thaws them."""
    import gc

    engine = Engine(loaded, config=EngineConfig(max_batch=2, max_seq_len=64, compile=True))
    engine.start()
    try:
        assert gc.get_freeze_count() > 0
        out = engine.submit(Request((1, 2, 3), SamplingParams(max_tokens=1, temperature=0.0))).result(timeout=120)
        assert out.completion_tokens == 1  # a prefill step only: nothing to compile
    finally:
        engine.stop()
    assert gc.get_freeze_count() == 0


def test_a_bank_input_is_stored_inside_the_fused_kernel_not_by_an_opaque_call():
    """`materialized` must keep a GELU from being recomputed per output element without
    splitting the site into separate kernels around an opaque call (methods.lower_materialize)."""
    from torch._inductor.utils import run_and_get_code

    from adapter_runtime.methods import lower_materialize, materialized

    lower_materialize()
    weights = torch.randn(5, 8, 16)

    def site(z: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        a = materialized(torch.nn.functional.gelu(z))  # [n, 16]
        return torch.bmm(weights[slots], a[:, :, None])[:, :, 0]  # [n, 8]

    z, slots = torch.randn(3, 16), torch.tensor([0, 4, 2])
    out, code = run_and_get_code(torch.compile(site, dynamic=False), z, slots)
    assert torch.allclose(out, site(z, slots), atol=1e-5)
    calls = "".join(code).split("def call(")[-1]
    assert "adapter_server.stored.default(" not in calls, "the stored input runs as an opaque call"
    assert calls.count("cpp_fused_") == 1, "the site is split into several kernels"


def test_a_variant_compiled_in_the_background_is_not_compiled_again_by_the_worker(loaded):
    """Regression: the compile thread ran its copy of a step with a tensor made outside inference
    mode; dynamo guards on a tensor's dispatch keys, so the worker's real step (inference tensors)
    failed the guard and compiled the variant again, on the worker, stalling every running
    request for the whole compile (2-3 s on the benchmark model)."""
    import threading

    from torch._dynamo.callback import callback_handler

    compiled_on: list[str] = []
    callback = callback_handler.register_start_callback(
        lambda _: compiled_on.append(threading.current_thread().name))
    engine = Engine(loaded, config=EngineConfig(max_batch=2, max_seq_len=64, compile=True))
    engine.start()
    try:
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        for _ in range(2):  # the first request's new variants compile in the background; the second uses them
            assert engine.submit(Request((1, 2, 3), params)).result(timeout=300).completion_tokens == 4
            engine.runner.wait_compiled()
        assert engine.runner.steps["compiled"] > 0
        assert "compile" in compiled_on and "engine" not in compiled_on
    finally:
        engine.stop()
        callback_handler.remove_start_callback(callback)


def test_the_compile_thread_hands_the_gil_back_quickly_while_it_compiles(loaded):
    """Regression: every torch op of the worker's eager step releases the GIL, and taking it back
    from the compile thread waited a whole switch interval (5 ms): an eager step during a compile
    took ~2.4 s instead of ~45 ms on the benchmark model. The compile thread runs with a short
    interval and restores the process's own when it ends."""
    import sys

    from adapter_runtime.runner import COMPILE_SWITCH_INTERVAL_S

    before = sys.getswitchinterval()
    engine = Engine(loaded, config=EngineConfig(max_batch=2, max_seq_len=64, compile=True))
    seen: list[float] = []
    compile_variant = engine.runner._compile_variant
    engine.runner._compile_variant = lambda *a: (seen.append(sys.getswitchinterval()), compile_variant(*a))
    engine.start()
    try:
        engine.runner.warm_up(wait=True)  # the base variants, in the compile thread
        assert seen and all(s == pytest.approx(COMPILE_SWITCH_INTERVAL_S) for s in seen)
        assert sys.getswitchinterval() == before
    finally:
        engine.stop()
