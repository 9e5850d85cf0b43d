"""adapter_runtime: the engine of adapter-server (no web framework in here)."""

from .threads import single_threaded_by_default

single_threaded_by_default()  # before anything imports torch: see threads.py
