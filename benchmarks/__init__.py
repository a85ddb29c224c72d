"""Benchmarks: quality vs NFE and latency/throughput of students against their multi-step teachers."""
