"""Issue 5: decode speed while one LoRA adapter is merged into the base weights.

Eight PEFT LoRA r=8 (q, v) adapters (randomized) are registered with the engine; one batch of
32 requests (~32-token prompts, fixed max_tokens, greedy) per scenario:

  (a) every row for lora0 while it is merged (`engine.merge("lora0")`), vs base-only traffic
      (no adapter, nothing merged) and vs the same lora0 traffic unmerged
  (b) mixed traffic: 24 rows over lora0..lora7 (three each) and 8 base rows, interleaved,
      with lora0 merged vs with nothing merged (the other rows then pay the unmerge correction)

Merged and unmerged scenarios alternate within each repetition (merge, run, reset); the best
decode tokens/s (time inside batched decode steps) of the repetitions is kept.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .common import header, hf_base, make_engine, ours_from, prompts, run_engine, save_peft_loras, table

NAME = "merge"
ADAPTERS = 8


def mixed_setups(get) -> list[tuple]:
    """32 rows: every fourth one is base, the others cycle through lora0..lora7."""
    rows, k = [], 0
    for i in range(32):
        if i % 4 == 3:
            rows.append(())
        else:
            rows.append((get(f"lora{k % ADAPTERS}"),))
            k += 1
    return rows


def run(quick: bool = False) -> str:
    from adapter_runtime.formats import load_adapter

    hf = hf_base()
    loaded = ours_from(hf)
    engine = make_engine(loaded, max_batch=32, max_seq_len=320)
    tmp = tempfile.TemporaryDirectory(prefix="bench-merge-")
    try:
        for name, d in save_peft_loras(hf, Path(tmp.name), ADAPTERS).items():
            engine.registry.register(name, load_adapter(d, loaded.info, name))
        get = engine.registry.get
        batch = prompts(32, 32, seed=41)
        max_tokens, reps = (32, 1) if quick else (48, 3)
        traffic = {"base": [()] * 32, "lora0": [(get("lora0"),)] * 32, "mixed": mixed_setups(get)}
        # (label, traffic, merged?) in the order each repetition runs them
        plan = [("base-only, nothing merged", "base", False), ("lora0 x32, unmerged", "lora0", False),
                ("mixed, nothing merged", "mixed", False), ("lora0 x32, lora0 merged", "lora0", True),
                ("mixed, lora0 merged", "mixed", True), ("base-only, lora0 merged", "base", True)]

        def one_pass(tokens: int, results: dict | None) -> None:
            engine.reset()
            for merged in (False, True):
                if merged:
                    engine.merge("lora0")
                for label, kind, m in plan:
                    if m == merged:
                        r = run_engine(engine, batch, tokens, traffic[kind])
                        if results is not None:
                            results[label].append(r)
            engine.reset()

        one_pass(4, None)  # warm up every path
        results = {label: [] for label, _, _ in plan}
        for _ in range(reps):
            one_pass(max_tokens, results)
    finally:
        engine.stop()
        tmp.cleanup()

    best = {k: max(v, key=lambda r: r.decode_tok_s) for k, v in results.items()}
    dec = {k: r.decode_tok_s for k, r in best.items()}
    e2e = {k: max(x.tok_s for x in v) for k, v in results.items()}
    base, unmerged, merged = "base-only, nothing merged", "lora0 x32, unmerged", "lora0 x32, lora0 merged"
    ratio = dec[merged] / dec[base]
    rows_a = [
        [base, e2e[base], dec[base], "1.00x", "", "", ""],
        [unmerged, e2e[unmerged], dec[unmerged], f"{dec[unmerged] / dec[base]:.2f}x", "1.00x", "", ""],
        [merged, e2e[merged], dec[merged], f"{ratio:.2f}x", f"{dec[merged] / dec[unmerged]:.2f}x", ">= 0.97x",
         "met" if ratio >= 0.97 else "MISSED"],
        ["base-only, lora0 merged", e2e["base-only, lora0 merged"], dec["base-only, lora0 merged"],
         f"{dec['base-only, lora0 merged'] / dec[base]:.2f}x", "", "", ""],
    ]
    out = [table(f"Issue 5 (a): one LoRA r=8 q,v merged, batch 32, ~32-token prompts, {max_tokens} new tokens, greedy "
                 f"(best of {reps}, interleaved)",
                 ["scenario", "e2e tok/s", "decode tok/s", "decode vs base", "vs unmerged", "target", ""], rows_a)]
    none, one = "mixed, nothing merged", "mixed, lora0 merged"
    rows_b = [[none, e2e[none], dec[none], f"{dec[none] / dec[base]:.2f}x", "1.00x"],
              [one, e2e[one], dec[one], f"{dec[one] / dec[base]:.2f}x", f"{dec[one] / dec[none]:.2f}x"]]
    out.append(table(f"Issue 5 (b): mixed traffic, 24 rows over {ADAPTERS} LoRAs (3 each) + 8 base rows",
                     ["scenario", "e2e tok/s", "decode tok/s", "decode vs base-only", "vs none merged"], rows_b))
    return "\n".join(out)


if __name__ == "__main__":
    print(header())
    print(run(quick="--quick" in __import__("sys").argv))
