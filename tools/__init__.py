"""Benchmarks, training and evaluation scripts (run as ``python -m tools.<name>``); not part of the package."""
