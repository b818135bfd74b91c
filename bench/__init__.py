"""Benchmarks; results are collected in BENCHMARKS.md."""
