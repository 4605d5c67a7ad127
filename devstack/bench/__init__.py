"""Benchmarks: our costs measured next to baselines on the local stack."""
