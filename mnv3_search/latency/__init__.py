"""Latency on the target: measuring back-ends and protocols (measure), the per-device table (table)."""

from .measure import BACKENDS, Backend, InterleavedPolicy, Measurement, make_backend, measure, measure_interleaved

__all__ = ["BACKENDS", "Backend", "InterleavedPolicy", "Measurement", "make_backend", "measure",
           "measure_interleaved"]
