"""Shared pieces: the ~40M random Llama (ours and transformers' from the same weights),
an engine that times its decode steps, a header line and a small table printer."""

from __future__ import annotations

import copy
import platform
import threading
import time
from dataclasses import dataclass

import torch

from adapter_runtime.engine import Engine, EngineConfig, Request
from adapter_runtime.models import LoadedModel, build_model
from adapter_runtime.sampling import SamplingParams
from adapter_runtime.threads import compute_threads, use_compute_threads
from tests.support.live import ServerProcess  # noqa: F401  (the server process helper, shared with the tests)

SEED = 0
VOCAB = 32000  # the 40M model: a 32k-token head, like real Llamas
SMALL_VOCAB = 384  # the same body with a small head: per-step overhead, not the head's GEMM, decides


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def header() -> str:
    d = device()
    name = torch.cuda.get_device_name(0) if d.type == "cuda" else platform.processor() or platform.machine()
    return (f"# torch {torch.__version__} | threads {compute_threads()} | device {d.type} ({name}) | "
            f"fp32 | model: random Llama (h512, 8 layers, 8 heads / 4 kv, ffn 1376, tied), vocab {VOCAB} (40M) "
            f"or {SMALL_VOCAB} (small head)")


def llama_config(vocab: int = VOCAB):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def hf_base(vocab: int = VOCAB):
    """The transformers model, seeded; every call returns the same weights (a fresh copy)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(SEED)
    config = llama_config(vocab)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", torch_dtype=torch.float32)
    model.generation_config.eos_token_id = None  # ignore_eos: always run to max_new_tokens
    model.generation_config.pad_token_id = 0
    return model.to(device()).eval().requires_grad_(False)


def ours_from(hf) -> LoadedModel:
    """Our model from the transformers model's weights (no checkpoint round trip needed)."""
    from adapter_runtime.tokenizer import build_byte_tokenizer

    state = {k: v.detach().clone().cpu() for k, v in hf.state_dict().items()}
    model = build_model(copy.deepcopy(hf.config), state, torch.float32, device())
    return LoadedModel(model, build_byte_tokenizer(), model.info, "bench-llama", (2,))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


class TimedEngine(Engine):
    """The engine, plus the time spent in (and tokens produced by) decode-only steps (sampling
    and output processing included, like a decode step of the old engine)."""

    def reset_timers(self) -> None:
        self.decode_s, self.decode_tokens, self.decode_steps = 0.0, 0, 0

    def _step(self, plan) -> None:
        if plan.prefill or plan.admitted:
            return super()._step(plan)
        t = time.perf_counter()
        super()._step(plan)
        if device().type == "cuda":
            torch.cuda.synchronize()
        self.decode_s += time.perf_counter() - t
        self.decode_tokens += len(plan.decode)
        self.decode_steps += 1


def make_engine(loaded: LoadedModel, max_batch: int = 32, max_seq_len: int = 320, compile: bool = False) -> TimedEngine:
    config = EngineConfig(max_batch=max_batch, max_seq_len=max_seq_len, max_queue=1024, compile=compile)
    engine = TimedEngine(loaded, config=config)
    if compile:
        engine.runner.warm_up(wait=True)
    engine.reset_timers()
    return engine.start()


def prompts(n: int, length: int | list[int], seed: int = 1, vocab: int = SMALL_VOCAB) -> list[list[int]]:
    """Random token ids below `vocab` (the small model's vocabulary: valid for both models)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [length] * n if isinstance(length, int) else length
    return [torch.randint(3, vocab, (L,), generator=g).tolist() for L in lengths]


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@dataclass
class EngineRun:
    wall_s: float
    tokens: int
    decode_s: float
    decode_tokens: int

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else float("nan")


def run_engine(engine: TimedEngine, batch: list[list[int]], max_tokens: int, setups=None) -> EngineRun:
    """Submit all requests at once, wait for all; generated tokens over wall time."""
    setups = setups or [()] * len(batch)
    engine.reset_timers()
    t = time.perf_counter()
    handles = [engine.submit(Request(tuple(p), params(max_tokens), s)) for p, s in zip(batch, setups)]
    results = [h.result(timeout=600) for h in handles]
    wall = time.perf_counter() - t
    tokens = sum(r.completion_tokens for r in results)
    assert tokens == max_tokens * len(batch), "every request must run to max_tokens"
    return EngineRun(wall, tokens, engine.decode_s, engine.decode_tokens)


def warm_until_compiled(engine, workload, attempts: int = 4) -> None:
    """Run `workload()` until a run has no decode step waiting for a compile of its variant
    (a background compile shares the CPU with whatever is timed next), waiting for the
    compiles each run queued."""
    runner = engine.runner
    for _ in range(attempts):
        before = runner.steps["static_eager"]
        workload()
        runner.wait_compiled()
        if runner.steps["static_eager"] == before:
            return


def on_compute_thread(fn):
    """fn() on a fresh thread with the engine worker's torch thread count, so that a peer gets
    the same CPUs our worker does (the main thread is single-threaded: adapter_runtime/threads.py);
    the thread's OpenMP pool goes away with it."""
    out = {}

    def target():
        use_compute_threads(compute_threads())
        try:
            out["value"] = fn()
        except BaseException as e:  # re-raised on the caller's thread
            out["error"] = e

    thread = threading.Thread(target=target, name="peer")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def on_main_thread_with_compute_threads(fn):
    """fn() on the calling (main) thread with the worker's thread count, then back to one
    thread. For a peer measured last: its pool may outlive the call and slow a later engine."""
    from adapter_runtime.threads import release_thread_pool

    before = torch.get_num_threads()
    use_compute_threads(compute_threads())
    try:
        return fn()
    finally:
        torch.set_num_threads(before)
        release_thread_pool()


def hf_generate(model, batch: list[list[int]], max_tokens: int, main_thread: bool = False,
                **kwargs) -> tuple[float, int]:
    """transformers greedy `generate` on a left-padded batch -> (wall seconds, new tokens), on
    a fresh compute thread (as our worker runs) or, `main_thread`, on the main thread."""
    run = on_main_thread_with_compute_threads if main_thread else on_compute_thread
    return run(lambda: _hf_generate(model, batch, max_tokens, **kwargs))


def _hf_generate(model, batch: list[list[int]], max_tokens: int, **kwargs) -> tuple[float, int]:
    L = max(len(p) for p in batch)
    ids = torch.zeros(len(batch), L, dtype=torch.long)
    mask = torch.zeros(len(batch), L, dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    ids, mask = ids.to(device()), mask.to(device())
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=0, **kwargs)
    if device().type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    new = out.shape[1] - L
    assert new == max_tokens
    return wall, new * len(batch)


def best(runs, key):
    return max(runs, key=key)


def table(title: str, columns: list[str], rows: list[list]) -> str:
    cells = [[c if isinstance(c, str) else f"{c:,.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(columns[i]), *(len(r[i]) for r in cells)) for i in range(len(columns))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    out = [f"\n## {title}", line(columns), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


# ---------------------------------------------------------------------- adapters made with PEFT
LORA_TARGETS = ["q_proj", "v_proj"]


def randomize(model, pattern: str, scale: float, seed: int, around_one: bool = False) -> None:
    """Overwrite every parameter whose name matches `pattern` with seeded noise (default
    adapter inits equal the base model, which would make every comparison trivial)."""
    import re

    g = torch.Generator().manual_seed(seed)
    rx = re.compile(pattern)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if rx.search(name):
                noise = torch.randn(p.shape, generator=g) * scale
                p.copy_((1 + noise if around_one else noise).to(p.device))


def save_peft_loras(base, root, count: int, seed: int = 100, r: int = 8) -> dict:
    """`count` randomized PEFT LoRA r=8 (q, v) adapters saved under root/lora/<name>;
    -> {name: directory}, names lora0..lora{count-1}."""
    from pathlib import Path

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, target_modules=LORA_TARGETS)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name="lora0")
    for i in range(1, count):
        model.add_adapter(f"lora{i}", config)
    for i in range(count):
        randomize(model, rf"lora_[AB]\.lora{i}\.", 0.05, seed=seed + i)
    root = Path(root)
    model.save_pretrained(root / "lora")
    return {f"lora{i}": root / "lora" / f"lora{i}" for i in range(count)}  # PEFT puts non-"default" names in subfolders


def save_peft_prefix(base, directory, virtual_tokens: int = 16, seed: int = 300):
    """A randomized PEFT prefix-tuning adapter saved to `directory`."""
    from peft import PrefixTuningConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens))
    randomize(model, r"prompt_encoder\.", 0.05, seed=seed)
    model.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------- a live server process
def save_checkpoint(hf, directory):
    """The transformers model as a local checkpoint the server can load (plus the byte tokenizer)."""
    from adapter_runtime.tokenizer import build_byte_tokenizer

    hf.save_pretrained(directory)
    build_byte_tokenizer().save_pretrained(directory)
    return directory


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sequence."""
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
