"""Latency and accuracy benchmarks that write JSON and plots (upcoming)."""
