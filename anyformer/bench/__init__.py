"""Benchmarks that print figures and write JSON/plots; never part of the test pass/fail."""
