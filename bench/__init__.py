"""Benchmarks: ``python -m bench.latency``, ``bench.pipeline``, ``bench.cpu_path``, ``bench.plot``."""
