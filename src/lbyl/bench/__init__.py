"""Benchmarks: restoration speed, memory and the latency of restored models."""
