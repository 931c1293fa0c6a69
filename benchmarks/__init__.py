"""Benchmarks, run by hand from the repository root: ``python -m benchmarks.bench_gsra``.

Shared timing, memory and reporting helpers live in :mod:`benchmarks._common`.
"""
