"""Replay one compiled decode step per workload inside the engine's worker (issue 11): the
steadiest A/B this drifting machine allows, and the tool that located the adapter kinds' cost.

One decode step of each workload (base, 32 distinct LoRAs, 32 adapters of all seven types; batch
32, vocabulary 384) is captured from the running engine, its KV writes redirected to the scratch
slot, and replayed back to back on the worker thread (where the OpenMP pool and the compiled
variants live), interleaved, min and median over many rounds. `--ablate` adds the all-type step
with one bank kind left out at a time (what each kind costs), with none (what its prefix
and prompt rows' longer cache reads cost), with every kind indexed by each row's own slot (what
routing rows without a kind to slot 0 saves: batch.routed_slots) and with every bottleneck site reading one adapter's
weights (the same compute: what the bottleneck weights' memory traffic costs), `--profile` prints torch.profiler's
top operators per workload (`TorchDynamo Cache Lookup` is the guard check).

    python -m benchmarks.replay [--ablate] [--profile] [--rounds 25]

To A/B a change of the forward, run it on both commits back to back and compare the ratios to
the base step, not the milliseconds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from .adapter_overhead import make_adapterhub_adapters, make_peft_adapters, mixed_names
from .common import (SMALL_VOCAB, Request, header, hf_base, make_engine, ours_from, params, prompts,
                     save_peft_loras, table, warm_until_compiled)


def capture(engine, batch, setups) -> object:
    """The widest compiled decode step of the workload, its KV writes sent to the scratch slot."""
    runner = engine.runner

    def workload(tokens=16):
        for h in [engine.submit(Request(tuple(p), params(tokens), s)) for p, s in zip(batch, setups)]:
            h.result(timeout=900)

    warm_until_compiled(engine, workload)  # every variant of the workload compiled
    seen = []
    run = runner._run_compiled
    runner._run_compiled = lambda b: (seen.append(b), run(b))[1]
    try:
        workload(8)
    finally:
        del runner._run_compiled
    step = max(seen, key=lambda b: b.num_tokens)
    return replace(step, write_slots=torch.full_like(step.write_slots, runner.scratch_slot))


def one_bottleneck_adapter(banks):
    """A view of `banks` whose every bottleneck site table is one present slot's, broadcast to all
    slots (stride 0): a step computes exactly as before but reads one adapter's weights."""
    from adapter_runtime.methods.bottleneck import COLUMN

    view = copy.copy(banks)
    view.banks = dict(banks.banks)
    bank = view.banks["bottleneck"] = copy.copy(banks.banks["bottleneck"])
    bank.sites = {}
    for site, tables in banks.banks["bottleneck"].sites.items():
        one = int(tables["flags"][:, COLUMN["present"]].nonzero()[0, 0])
        bank.sites[site] = {name: t[one : one + 1].expand_as(t) for name, t in tables.items()}
    return view


def on_worker(engine, fn) -> None:
    """Run fn() on the engine's worker thread, between two steps of a one-token request."""
    inner = engine._step

    def step(plan):
        with torch.inference_mode():
            fn()
        return inner(plan)

    engine._step = step
    try:
        engine.submit(Request((1, 2, 3), params(1), ())).result(timeout=3600)
    finally:
        engine._step = inner


def replay(engine, steps: dict, rounds: int, per_round: int = 5) -> dict[str, list[float]]:
    """{label: ms per forward, one value per round}, the labels interleaved in every round."""
    run = engine.runner._run_compiled
    times = {k: [] for k in steps}

    def go():
        for b in steps.values():  # compiles a variant not met before (ablations)
            run(b)
        for _ in range(rounds):
            for k, b in steps.items():
                t = time.perf_counter()
                for _ in range(per_round):
                    run(b)
                times[k].append((time.perf_counter() - t) / per_round * 1e3)

    on_worker(engine, go)
    return times


def profile_table(engine, steps: dict, top: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    run, out = engine.runner._run_compiled, []

    def go():
        for k, b in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(20):
                    run(b)
            out.append(f"## {k}: per step, 20 steps\n"
                       + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))

    on_worker(engine, go)
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.replay", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--ablate", action="store_true", help="also the all-type step without each bank kind, with none, and with one bottleneck adapter's bytes")
    ap.add_argument("--profile", action="store_true", help="torch.profiler's top operators per workload")
    args = ap.parse_args()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    print(header(), flush=True)
    hf = hf_base(SMALL_VOCAB)
    loaded = ours_from(hf)
    engine = make_engine(loaded, max_batch=32, compile=True)
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        from adapter_runtime.formats import load_adapter

        root = Path(tmp)
        (root / "peft").mkdir()
        (root / "hub").mkdir()
        dirs = save_peft_loras(hf, root, 32)
        dirs.update(make_peft_adapters(hf, root / "peft")[1])
        dirs.update(make_adapterhub_adapters(hf, root / "hub"))
        for name, d in dirs.items():
            engine.registry.register(name, load_adapter(d, loaded.info, name))
        get = engine.registry.get
        batch = prompts(32, 32, seed=32)
        workloads = {"base": [()] * 32, "32 distinct LoRAs": [(get(f"lora{i}"),) for i in range(32)],
                     "32 adapters, all seven types": [(get(n),) for n in mixed_names()]}
        try:
            steps = {k: capture(engine, batch, setups) for k, setups in workloads.items()}
            if args.ablate:
                mix = steps["32 adapters, all seven types"]
                for kind in mix.adapters.active:
                    active = {k: v for k, v in mix.adapters.active.items() if k != kind}
                    steps[f"all seven types without {kind}"] = replace(mix, adapters=replace(mix.adapters, active=active))
                # what is left with every bank off: the prefix / prompt rows' longer cache reads
                steps["all seven types, no bank kind"] = replace(mix, adapters=replace(mix.adapters, active={}))
                # every kind indexed by each row's own slot, as before the routed slots: rows then
                # read their own slot's zeros in every kind they lack (the same graph, other indices)
                own = torch.stack(list(mix.adapters.slots.values())).amax(0)  # a row's slot, whatever the kind
                steps["all seven types, unrouted slots"] = replace(mix, adapters=replace(
                    mix.adapters, slots={k: own.clone() for k in mix.adapters.slots}))
                # the same bottleneck compute over one adapter's bytes: what its weights' traffic costs
                steps["all seven types, bottleneck bytes of one"] = replace(
                    mix, adapters=replace(mix.adapters, banks=one_bottleneck_adapter(mix.adapters.banks)))
            times = replay(engine, steps, args.rounds)
            base = min(times["base"])
            rows = [[k, min(v), statistics.median(v), f"{min(v) / base:.2f}x", f"{base / min(v):.2f}x"]
                    for k, v in times.items()]
            print(table(f"Compiled decode step replayed on the worker, batch 32, vocab {SMALL_VOCAB} "
                        f"({args.rounds} interleaved rounds of 5)",
                        ["step", "min ms", "median ms", "/ base", "base / it (tok/s ratio)"], rows), flush=True)
            if args.profile:
                print(profile_table(engine, {k: steps[k] for k in workloads}), flush=True)
        finally:
            engine.stop()


if __name__ == "__main__":
    main()
