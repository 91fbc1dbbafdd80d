"""``deepspeed.profiling.flops_profiler``: per-module parameters, FLOPs/MACs and forward latency of a model, and the
achieved FLOP/s (and MFU, given the device's peak) of a training step. See ``profiler.py``."""

from shardwise.profiling.flops_profiler.profiler import FlopsProfiler, ModuleStats, get_model_profile
from shardwise.profiling.flops_profiler.report import (
    duration_to_string,
    flops_to_string,
    macs_to_string,
    number_to_string,
    params_to_string,
)

__all__ = ["FlopsProfiler", "ModuleStats", "duration_to_string", "flops_to_string", "get_model_profile",
           "macs_to_string", "number_to_string", "params_to_string"]
