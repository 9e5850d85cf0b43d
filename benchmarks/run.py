"""Run the benchmarks: `python -m benchmarks.run [--quick] [--only NAME]`.

Each benchmark prints a table with absolute numbers and ratios measured side by side in the
same process, under one header line (torch version, threads, device)."""

from __future__ import annotations

import argparse
import logging
import time
import warnings

from . import adapter_overhead, compose, engine_vs_hf, lifecycle, merge_traffic, peers
from .common import header

BENCHMARKS = {m.NAME: m for m in (engine_vs_hf, adapter_overhead, compose, lifecycle, merge_traffic, peers)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer tokens and one repetition (about half the time)")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append", help="run only this benchmark (repeatable)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    print(header() + (" | --quick" if args.quick else ""), flush=True)
    for name in args.only or list(BENCHMARKS):
        t = time.perf_counter()
        print(BENCHMARKS[name].run(quick=args.quick), flush=True)
        print(f"({name}: {time.perf_counter() - t:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
