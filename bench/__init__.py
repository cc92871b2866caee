"""Benchmark harness (issue 4): `python -m bench [--quick] [--out bench/results.json]`."""
