"""Throughput benchmarks (not tests) and DeepSeek's reference generation loops used as baselines."""
