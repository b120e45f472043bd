"""Benchmarks of the loop's slow parts: python -m bench.NAME from the repository's root (docs/benchmarks.md)."""
