"""Only the engine's worker runs torch multi-threaded (adapter_runtime/threads.py): every other
thread's OpenMP pool slows the worker's parallel regions (libgomp stops spin-waiting once its
pools hold more threads than there are CPUs)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from adapter_runtime.engine import IDLE_RELEASE_S, Engine, EngineConfig, EngineHooks, Request
from adapter_runtime.models import load_model
from adapter_runtime.sampling import SamplingParams
from adapter_runtime.threads import _openmp_pause, compute_threads
from tests.support.tiny import hf_model, save_checkpoint


def _run(code: str, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip()


def test_importing_the_runtime_first_makes_other_threads_single_threaded():
    assert _run("import adapter_runtime, torch; print(torch.get_num_threads())") == "1"
    assert _run("import server, torch; print(torch.get_num_threads())") == "1"  # the server's entry point
    # a user's own setting is kept, and is then the engine's thread count too
    assert _run("import os, adapter_runtime; from adapter_runtime.threads import compute_threads; "
                "print(os.environ['OMP_NUM_THREADS'], compute_threads())", OMP_NUM_THREADS="3") == "3 3"


def _threads_of_this_process() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or _openmp_pause() is None,
                    reason="counts threads through /proc and needs the OpenMP runtime's pause call (Linux)")
def test_the_worker_runs_with_the_configured_threads_and_lets_its_pool_go_when_idle(tmp_path):
    try:  # another package's own copy of libgomp in the process (as the oracles bring): torch's must be paused
        import sklearn.utils._openmp_helpers  # noqa: F401
    except ImportError:
        pass
    _openmp_pause.cache_clear()  # looked up again with both copies loaded
    seen = []
    hooks = EngineHooks(first_token=lambda request, seconds: seen.append((threading.current_thread().name,
                                                                         torch.get_num_threads())))
    loaded = load_model(save_checkpoint(hf_model("llama"), tmp_path / "m"))
    with Engine(loaded, config=EngineConfig(max_batch=2, max_seq_len=160, threads=3), hooks=hooks) as engine:
        time.sleep(2 * IDLE_RELEASE_S)
        idle = _threads_of_this_process()
        engine.submit(Request(tuple(range(5, 133)), SamplingParams(max_tokens=2, ignore_eos=True))).result(timeout=60)
        busy = _threads_of_this_process()  # the worker's two OpenMP helpers, until it has idled a while
        time.sleep(4 * IDLE_RELEASE_S)
        assert busy >= idle + 2 and _threads_of_this_process() <= busy - 2  # its two helpers are gone
    assert seen == [("engine", 3)]
    assert compute_threads(2) == 2
