"""benchmarks/profiling.py's timeline arithmetic on hand-made kernel spans (the GPU part runs on the device)."""

from __future__ import annotations

import pytest

from benchmarks.profiling import by_kind, chrome_kernels, kernel_kind, timeline

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


def test_power_probe_summarises_clocks_power_and_the_power_cap_share(monkeypatch):
    """benchmarks/power_probe.Sampler on a stand-in NVML (the real one reads the GPU on the device): the median and
    extremes of the SM clock, the mean and peak power in W, and the share of samples with each clock-event bit."""
    import itertools
    import sys
    import types

    from benchmarks import power_probe

    readings = itertools.cycle([(1980, 300_000, 0x0), (1635, 700_000, 0x4), (1515, 690_000, 0x4 | 0x20)])
    current = {}

    def clock(handle, kind):
        current["reading"] = next(readings)
        return current["reading"][0]

    nvml = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda index: "gpu", NVML_CLOCK_SM=0,
        nvmlDeviceGetEnforcedPowerLimit=lambda handle: 700_000, nvmlDeviceGetClockInfo=clock,
        nvmlDeviceGetPowerUsage=lambda handle: current["reading"][1],
        nvmlDeviceGetCurrentClocksEventReasons=lambda handle: current["reading"][2],
    )  # fmt: skip
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(power_probe.torch.cuda, "current_device", lambda: 0)
    sampler = power_probe.Sampler(period=0.0)
    sampler._run = lambda: [sampler.samples.append(sampler._read()) for _ in range(6)]  # two full cycles, no thread
    summary = sampler.measure(lambda: 42)
    assert summary["value"] == 42 and summary["samples"] == 6
    assert (summary["sm_mhz_median"], summary["sm_mhz_min"], summary["sm_mhz_max"]) == (1635, 1515, 1980)
    assert summary["power_w_mean"] == pytest.approx(1690 / 3) and summary["power_w_max"] == 700
    assert summary["power_limit_w"] == 700
    assert summary["reason_share"]["sw_power_cap"] == pytest.approx(2 / 3)
    assert summary["reason_share"]["sw_thermal"] == pytest.approx(1 / 3)
    assert summary["reason_share"]["hw_slowdown"] == 0
    empty = power_probe.Sampler(period=0.0)
    empty._run = lambda: None  # work done before the first read: one read after it
    assert empty.measure(lambda: None)["samples"] == 1


def test_kernel_kinds_drop_inductors_index_only():
    assert kernel_kind("triton_poi_fused_add_mul_split_view_14") == "triton_poi_fused_add_mul_split_view"
    assert kernel_kind("triton_red_fused_abs_amax_6") == "triton_red_fused_abs_amax"
    cublas = "nvjet_sm90_qqtst_128x128_128x6_1x4_h_bz_ovscale_TNT"  # not Inductor's: kept whole
    assert kernel_kind(cublas) == cublas
    assert kernel_kind("_qk_norm_rope_fwd_kernel") == "_qk_norm_rope_fwd_kernel"
    # the same generated kernel, numbered _4 in one graph and _8 in the other, is one kind
    kinds = by_kind({"triton_poi_fused_cat_4": (1.0, 2), "triton_poi_fused_cat_8": (0.5, 1), "gemm": (3.0, 1)})
    assert kinds == {"triton_poi_fused_cat": (1.5, 3), "gemm": (3.0, 1)}
