"""benchmarks/profiling.py's timeline arithmetic on hand-made kernel spans (the GPU part runs on the device)."""

from __future__ import annotations

import pytest

from benchmarks.profiling import chrome_kernels, timeline

MS = 1_000_000  # ns


def test_timeline_splits_the_span_into_compute_exposed_communication_and_idle():
    kernels = [
        ("gemm", 0 * MS, 4 * MS),
        ("ncclDevKernel_SendRecv", 3 * MS, 6 * MS),  # 1 ms beside the GEMM, 2 ms exposed
        ("attention", 6 * MS, 9 * MS),
        ("attention", 8 * MS, 10 * MS),  # overlapping compute counts once
        ("ncclDevKernel_AllGather", 12 * MS, 13 * MS),  # after 2 ms with nothing running
    ]
    parts = timeline(kernels, steps=1)
    assert parts == pytest.approx(
        {"span": 13.0, "compute": 8.0, "communication": 4.0, "exposed_communication": 3.0, "idle": 2.0}
    )
    assert parts["compute"] + parts["exposed_communication"] + parts["idle"] == pytest.approx(parts["span"])


def test_timeline_is_per_step_and_empty_without_kernels():
    assert timeline([("k", 0, 4 * MS)], steps=2) == pytest.approx(
        {"span": 2.0, "compute": 2.0, "communication": 0.0, "exposed_communication": 0.0, "idle": 0.0}
    )
    assert timeline([], steps=1) == {}


def test_chrome_kernels_reads_the_kernel_events_of_a_trace_in_start_order():
    trace = {
        "traceEvents": [
            {"ph": "X", "cat": "kernel", "name": "nccl", "ts": 12.5, "dur": 2.0},
            {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 1.0, "dur": 30.0},  # host side: not a kernel
            {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 3.0, "dur": 1.0},
            {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 10.0, "dur": 2.25},
            {"ph": "i", "cat": "kernel", "name": "marker", "ts": 11.0},
        ]
    }
    assert chrome_kernels(trace) == [("gemm", 10_000, 12_250), ("nccl", 12_500, 14_500)]
    assert chrome_kernels({}) == []
