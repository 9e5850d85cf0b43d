"""Where a decode step's time goes (issue 11): per decode step, wall ms and the engine worker
thread's CPU ms of each part - the compiled forward, the batch build around it, sampling and
output processing - for base batch 32 and batch 1, timed after the static step's compiles.

    python -m benchmarks.step_profile [--threads N]

The worker's CPU time is robust to a busy machine, wall time is not. With `--threads 1`
(the default) all of a step's work runs on the worker thread, so its CPU time is the step's
whole cost; with more threads the forward's kernels share the work with torch's pool.
"""

from __future__ import annotations

import argparse
import time

import torch

from .common import SMALL_VOCAB, Request, header, hf_base, make_engine, ours_from, params, prompts, table

PARTS = {  # label -> (object attribute path on the engine, attribute)
    "compiled forward": ("runner", "_run_compiled"),
    "runner.execute (batch build + forward)": ("runner", "execute"),
    "sampling (choose)": (None, "choose"),
    "output processing (all rows)": (None, "_accept"),
}


def profile(engine, batch: list[list[int]], new_tokens: int) -> dict[str, tuple[float, float]]:
    """{part: (wall ms, worker CPU ms)} per decode-only step, over two runs of the batch."""
    from adapter_runtime import engine as engine_module

    acc: dict[str, list[float]] = {}
    timing = [False]

    def timed(owner, name, label):
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if not timing[0]:
                return inner(*args, **kwargs)
            t, c = time.perf_counter(), time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                a = acc.setdefault(label, [0.0, 0.0])
                a[0] += time.perf_counter() - t
                a[1] += time.thread_time() - c

        setattr(owner, name, wrapper)
        return inner

    originals = []
    for label, (path, name) in PARTS.items():
        owner = engine_module.sampling if name == "choose" else getattr(engine, path) if path else engine
        originals.append((owner, name, timed(owner, name, label)))
    step = engine._step
    steps = [0]

    def decode_step(plan):
        if plan.prefill or plan.admitted:
            return step(plan)
        timing[0] = True
        t, c = time.perf_counter(), time.thread_time()
        try:
            return step(plan)
        finally:
            timing[0] = False
            a = acc.setdefault("whole step", [0.0, 0.0])
            a[0] += time.perf_counter() - t
            a[1] += time.thread_time() - c
            steps[0] += 1

    def run():
        handles = [engine.submit(Request(tuple(p), params(new_tokens), ())) for p in batch]
        for h in handles:
            assert h.result(timeout=900).completion_tokens == new_tokens

    run()
    engine.runner.wait_compiled()
    run()
    engine._step = decode_step
    try:
        run()
        run()
    finally:
        engine._step = step
        for owner, name, inner in originals:
            setattr(owner, name, inner)
    return {k: (w / steps[0] * 1e3, c / steps[0] * 1e3) for k, (w, c) in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step_profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    print(header(), flush=True)
    engine = make_engine(ours_from(hf_base(SMALL_VOCAB)), max_batch=32, compile=True)
    try:
        for size, seed in ((32, 32), (1, 1)):
            parts = profile(engine, prompts(size, 32, seed=seed), 64)
            whole = parts["whole step"][1]
            rows = [[k, w, c, f"{c / whole:.0%}"] for k, (w, c) in parts.items()]
            print(table(f"Decode step parts, base, batch {size}, vocab {SMALL_VOCAB}, {args.threads} thread(s)",
                        ["part", "wall ms", "worker CPU ms", "of the step's CPU"], rows), flush=True)
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
