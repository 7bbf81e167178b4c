"""Benchmarks: `specfleet bench ...` commands and their held-out prompt sets."""
