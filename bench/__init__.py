"""Benchmarks and the toy world they measure on (not part of the installed package)."""
