"""Benchmarks that compare side by side (`make bench`)."""
