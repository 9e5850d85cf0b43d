"""Reproducible benchmarks that print absolute numbers and side-by-side ratios.

Not part of the test suite. Entry point: `python -m benchmarks.run [--quick] [--only NAME]`.
"""

import adapter_runtime  # noqa: F401  (before torch: the process's default OpenMP threads, adapter_runtime/threads.py)
