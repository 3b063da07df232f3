"""Latency on the target: backends and the timing protocol, and the per-device lookup table built on them.

backends (what runs a module, FP32 or INT8, here or on a device reached by a command) · protocol (how runners
are timed) · keys (what an entry stands for) · calibration (from a sum of entries to a whole network) · tablefile
(the versioned JSON file) · table (the LatencyTable: measure, predict) · store (the machine's tables, runs' use
of them) · check (predictions vs networks measured now) · verdict (a budget judged through a reference timed now).

This package never imports `prune`: the networks it needs beyond the seed (NetAdapt's keys, calibration
companions, check variants) are made by `prune.variants` and passed in.
"""

from .backends import (BACKENDS, PRECISIONS, Backend, BackendBase, OnnxRuntimeBackend, TorchCudaBackend,
                       TorchEagerBackend, available_backends, backend_class, device_fingerprint, export_onnx,
                       make_backend, onnx_bytes, quantize_onnx, register_backend, thread_clock_ok, torch_threads)
from .calibration import Calibration, CalibrationChoice, choose_calibration, fit_calibration, fit_model, heldout_text
from .check import CheckReport, CheckRow, ErrorSummary, check_table, check_variants, summarize_errors
from .keys import BlockKey, keys_of, spec_keys
from .protocol import (Comparison, InterleavedPolicy, Measurement, MeasurementContext, Runner, SelfTimed,
                       TimingPolicy, Together, compare, measure, measure_interleaved, measure_together, ratio_shift,
                       summarize)
from .store import (BuildReport, build_table, default_table_dir, default_table_path, open_for_run, table_file_name,
                    table_record)
from .table import LatencyTable, Prediction
from .tablefile import FORMAT_VERSION, Entry, Header, read_table_file
from .verdict import RelativeVerdict, relative_to_reference

__all__ = [
    "BACKENDS", "PRECISIONS", "Backend", "BackendBase", "OnnxRuntimeBackend", "TorchCudaBackend",
    "TorchEagerBackend", "available_backends", "backend_class", "device_fingerprint", "export_onnx", "make_backend",
    "onnx_bytes", "quantize_onnx", "register_backend", "thread_clock_ok", "torch_threads",
    "Calibration", "CalibrationChoice", "choose_calibration", "fit_calibration", "fit_model", "heldout_text",
    "CheckReport", "CheckRow", "ErrorSummary", "check_table", "check_variants", "summarize_errors",
    "BlockKey", "keys_of", "spec_keys",
    "Comparison", "InterleavedPolicy", "Measurement", "MeasurementContext", "Runner", "SelfTimed", "TimingPolicy",
    "Together",
    "compare", "measure", "measure_interleaved", "measure_together", "ratio_shift", "summarize",
    "BuildReport", "build_table", "default_table_dir", "default_table_path", "open_for_run", "table_file_name",
    "table_record",
    "LatencyTable", "Prediction",
    "FORMAT_VERSION", "Entry", "Header", "read_table_file",
    "RelativeVerdict", "relative_to_reference",
]
