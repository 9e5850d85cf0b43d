"""The test suite (layout mirrors the source)."""

import adapter_runtime  # noqa: F401  (before torch: the process's default OpenMP threads, adapter_runtime/threads.py)
