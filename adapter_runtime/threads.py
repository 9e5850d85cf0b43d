"""Which threads do torch's math, and with how many OpenMP threads.

The engine's worker thread (and the compile thread, whose kernels bake in its thread count)
run the model with `compute_threads()` OpenMP threads; every other thread of the process
(the server's event loop, its request threads, the main thread that loaded the model) should
run torch single-threaded. Why: GNU OpenMP (torch's libgomp) keeps a pool of helper threads
for each thread that ever ran a parallel region, and once the pools hold more threads than
there are CPUs it stops spin-waiting between regions and puts its helpers to sleep after each
one. A decode step is a few hundred short regions, so the worker then pays a futex wake-up
per kernel: measured on a 2-core machine, the same compiled decode step ran in 4.1 ms on the
main thread and 8 ms on a worker thread after the main thread had loaded the model with two
threads, 4.1 ms again once the main thread had stayed single-threaded (benchmarks/README.md).

`single_threaded_by_default()` sets OMP_NUM_THREADS=1 for the process, which libgomp reads
once when torch is first imported; entry points call it before importing torch. A user's own
OMP_NUM_THREADS is left alone (then it is also what `compute_threads` defaults to).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from typing import Callable

_USER_OMP_THREADS = os.environ.get("OMP_NUM_THREADS")  # as the user set it, before we default it


def single_threaded_by_default() -> None:
    """OMP_NUM_THREADS=1, unless the user set it or torch is already imported (too late then:
    libgomp has read the environment; the engine still runs, only its steps are slower)."""
    if _USER_OMP_THREADS is None and "torch" not in sys.modules:
        os.environ["OMP_NUM_THREADS"] = "1"


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def compute_threads(requested: int | None = None) -> int:
    """The engine's torch threads: `requested`, else the user's OMP_NUM_THREADS, else every CPU
    this process may run on."""
    if requested:
        return max(1, int(requested))
    if _USER_OMP_THREADS and _USER_OMP_THREADS.isdigit() and int(_USER_OMP_THREADS) > 0:
        return int(_USER_OMP_THREADS)
    return available_cpus()


def use_compute_threads(n: int) -> None:
    """Give the calling thread (the engine worker, the compile thread) n torch threads."""
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@functools.cache
def _openmp_pause() -> Callable[[int], int] | None:
    """omp_pause_resource_all of the OpenMP runtime torch uses (libgomp, or LLVM/Intel's), if any.
    Other packages bring their own copies (scikit-learn's libgomp-<hash>.so): torch's own, in
    its lib folder, comes first, since pausing another runtime leaves torch's pools alone."""
    import torch

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if line.rstrip().endswith(".so") or ".so." in line}
    except OSError:  # not on Linux: nothing to release
        return None
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    runtimes = [p for p in paths if any(name in p.rsplit("/", 1)[-1] for name in ("libgomp", "libiomp5", "libomp"))]
    for path in sorted(runtimes, key=lambda p: (not p.startswith(torch_dir), p)):
        try:
            return getattr(ctypes.CDLL(path), "omp_pause_resource_all", None)
        except OSError:
            continue
    return None


def release_thread_pool() -> None:
    """Let the calling thread's OpenMP helper threads exit (the engine worker does it when idle,
    so that an idle engine does not slow another thread's math; its next step starts new ones)."""
    if (pause := _openmp_pause()) is not None:
        pause(1)  # omp_pause_soft
