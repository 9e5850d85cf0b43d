"""Reproducible benchmarks that print absolute numbers and side-by-side ratios.

Not part of the test suite. Entry point: `python -m benchmarks.run [--quick] [--only NAME]`.
"""
