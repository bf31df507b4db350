"""Latency and accuracy benchmarks (issues 3-5); nothing here yet."""
