"""Issue 13: decode throughput of composition blocks at batch 32, against the base model.

The benchmark Llama with the small vocabulary (benchmarks/common.py, as in peers.py), four AdapterHub bottleneck adapters and an
AdapterFusion of three of them, made and randomized with the `adapters` library and read back
from its files. Scenarios, 32 engine rows each, 32-token prompts, greedy, fixed max_tokens:

  base                      no adapter
  one bottleneck            the same Pfeiffer adapter on every row (banked path)
  Fuse of 3                 {"fuse": ["a", "b", "c"]} on every row (per-row side path)
  Parallel of 4             8 prompts x {"parallel": ["a", "b", "c", "d"]}: a channel of one
                            adapter is a plain row, so this runs on the banked path
  Average of 2              {"average": ["a", "b"]} on every row (side path)

Decode tok/s as peers.py measures it (compiled static step, timed after the compiles the
workload queued; (n - 1) tokens per row over the time of n tokens minus the time of one);
ratios are to the base model in the same run (this machine's noise is +-15-25 % between runs;
the whole table is repeated `rounds` times and each round's ratios are printed).
`python -m benchmarks.compose [--quick]`.
"""

from __future__ import annotations

import argparse
import copy
import re
import tempfile
from pathlib import Path

from .common import SMALL_VOCAB, header, hf_base, make_engine, ours_from, prompts, randomize, table
from .peers import ours_rate

NAME = "compose"


def make_adapters(base, root: Path) -> dict[str, Path]:
    """Four SeqBn adapters (a..d) and the fusion `fus` of a, b, c, saved by the library."""
    import adapters
    from adapters import SeqBnConfig
    from adapters.composition import Fuse

    model = copy.deepcopy(base)
    adapters.init(model)
    dirs = {}
    for i, name in enumerate("abcd"):
        model.add_adapter(name, config=SeqBnConfig(reduction_factor=16))
        randomize(model, rf"\.{name}\.", 0.05, seed=500 + i)
        model.save_adapter(str(root / name), name)
        dirs[name] = root / name
    model.add_adapter_fusion(Fuse("a", "b", "c", name="fus"), config="dynamic")
    randomize(model, re.escape("adapter_fusion_layer.fus."), 0.05, seed=510)
    (root / "fus").mkdir()
    model.save_adapter_fusion(str(root / "fus"), "fus")
    dirs["fus"] = root / "fus"
    return dirs


def run(quick: bool = False) -> str:
    from adapter_runtime.composition import request_rows
    from adapter_runtime.formats import load_adapter

    base = hf_base(SMALL_VOCAB)
    loaded = ours_from(base)
    engine = make_engine(loaded, max_batch=32, compile=True)
    tmp = tempfile.TemporaryDirectory(prefix="bench-compose-")
    try:
        for name, d in make_adapters(base, Path(tmp.name)).items():
            engine.registry.register(name, load_adapter(d, loaded.info, name))
        registry = engine.registry

        def rows(spec, n_prompts: int) -> list:
            return [registry.resolve(registry.base_name, row) for per in request_rows(spec, n_prompts) for row in per]

        batch32, batch8 = prompts(32, 32, seed=21), prompts(8, 32, seed=21)
        scenarios = {  # name -> (prompts, one setup per engine row)
            "base (no adapter)": (batch32, [()] * 32),
            "one bottleneck on all 32 rows": (batch32, [registry.resolve("a")] * 32),
            "Fuse of 3, all 32 rows": (batch32, rows({"fuse": ["a", "b", "c"]}, 1) * 32),
            "Parallel of 4 x 8 prompts": ([p for p in batch8 for _ in range(4)],
                                          rows({"parallel": ["a", "b", "c", "d"]}, 8)),
            "Average of 2, all 32 rows": (batch32, rows({"average": ["a", "b"]}, 1) * 32),
        }
        max_tokens, rounds = (16, 1) if quick else (64, 2)
        measured = {k: [] for k in scenarios}
        for _ in range(rounds):
            for k, (batch, setups) in scenarios.items():
                measured[k].append(ours_rate(engine, batch, max_tokens, setups, reps=1 if quick else 3))
        base_runs = [r for r, _ in measured["base (no adapter)"]]
        table_rows = []
        for k, runs in measured.items():
            ratios = " / ".join(f"{r / b:.2f}x" for (r, _), b in zip(runs, base_runs))
            table_rows.append([k, " / ".join(f"{r:,.0f}" for r, _ in runs), " / ".join(s for _, s in runs), ratios])
        return table(f"Issue 13: compositions at batch 32, vocab {SMALL_VOCAB}, {max_tokens} new tokens "
                     f"({rounds} rounds, each best of 3)",
                     ["scenario", "decode tok/s per round", "steps compiled/eager", "x base per round"], table_rows)
    finally:
        engine.stop()
        tmp.cleanup()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compose", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print(header(), flush=True)
    print(run(quick=args.quick), flush=True)


if __name__ == "__main__":
    main()
