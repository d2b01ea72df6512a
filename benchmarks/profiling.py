"""One pipeline call's GPU kernel time per kernel name, and its kernels' timeline (what ran beside what, and when
the GPU stood idle), from torch.profiler (shared by the profile_* scripts)."""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict

import torch


def call_kernels(call, width: int = 110) -> list[tuple[float, int, str]]:
    """(ms, launches, name) of one `call()`'s GPU kernels (names cut to `width` characters), largest first, after a
    warm-up call."""
    call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    found: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us > 0:
            found[event.key[:width]][0] += device_us / 1e3
            found[event.key[:width]][1] += event.count
    return sorted(((ms, count, name) for name, (ms, count) in found.items()), reverse=True)


def kernel_times(pipe, height: int, width: int, steps: int) -> dict[str, tuple[float, int]]:
    """{kernel name (100 characters): (ms per step, launches per step)} of one call, after a warm-up call."""
    found = call_kernels(lambda: _call(pipe, height, width, steps), width=100)
    return {name: (ms / steps, count // steps) for ms, count, name in found}


def kernel_kind(name: str) -> str:
    """A kernel's name without Inductor's index (`triton_poi_fused_add_mul_5` -> `triton_poi_fused_add_mul`): one
    generated kernel is numbered differently in two graphs (a step with and one without an adapter), so what grew
    between two profiles is read by kind, not by name (2026-12-02: `..._4` without, `..._8` with, one kernel)."""
    stem, _, index = name.rpartition("_")
    return stem if name.startswith("triton_") and index.isdigit() else name


def by_kind(times: dict[str, tuple[float, int]]) -> dict[str, tuple[float, int]]:
    """kernel_times' {name: (ms, launches)} summed by kernel_kind."""
    kinds: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for name, (ms, launches) in times.items():
        kinds[kernel_kind(name)][0] += ms
        kinds[kernel_kind(name)][1] += launches
    return {kind: (ms, launches) for kind, (ms, launches) in kinds.items()}


def _call(pipe, height: int, width: int, steps: int) -> None:
    pipe("a photograph of an astronaut", height=height, width=width, num_inference_steps=steps,
         generator=torch.Generator().manual_seed(0), output_type="latent")  # fmt: skip


def kernel_intervals(pipe, height: int, width: int, steps: int, trace: str | None = None) -> list[tuple[str, int, int]]:
    """(name, start ns, end ns) of every GPU kernel of one call, after a warm-up call (which captures the CUDA graphs
    of a graph preset: CUPTI reports the kernels a graph replay runs too). trace: keep the Chrome trace there.

    Read from the exported Chrome trace, whose format is the same on every torch release (the profiler's event
    objects are not: torch 2.11's have no activity_type())."""
    _call(pipe, height, width, steps)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _call(pipe, height, width, steps)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        path = trace or os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as file:
            return chrome_kernels(json.load(file))


def chrome_kernels(trace: dict) -> list[tuple[str, int, int]]:
    """(name, start ns, end ns) of the GPU kernels in a Chrome trace (complete events of category "kernel"; times
    in microseconds there), in start order."""
    found = [
        (event["name"], round(event["ts"] * 1000), round((event["ts"] + event["dur"]) * 1000))
        for event in trace.get("traceEvents", [])
        if event.get("ph") == "X" and event.get("cat") == "kernel"
    ]
    return sorted(found, key=lambda kernel: kernel[1])


def _union_ns(spans: list[tuple[int, int]]) -> int:
    """The length of the union of [start, end) spans."""
    total, reach = 0, None
    for start, end in sorted(spans):
        if reach is None or start > reach:
            total, reach = total + end - start, end
        elif end > reach:
            total, reach = total + end - reach, end
    return total


def timeline(kernels: list[tuple[str, int, int]], steps: int, comm=("nccl",)) -> dict[str, float]:
    """Where one call's GPU time went, per step (ms): its span from the first kernel's start to the last one's end;
    compute (any non-communication kernel running), communication kernels, the part of those with no compute beside
    them (exposed), and idle (no kernel at all). span = compute + exposed + idle."""
    if not kernels:
        return {}
    is_comm = [any(key in name.lower() for key in comm) for name, _, _ in kernels]
    compute = [(start, end) for (_, start, end), c in zip(kernels, is_comm, strict=True) if not c]
    communication = [(start, end) for (_, start, end), c in zip(kernels, is_comm, strict=True) if c]
    every = compute + communication
    span = max(end for _, end in every) - min(start for start, _ in every)
    busy, computing, talking = _union_ns(every), _union_ns(compute), _union_ns(communication)
    per_step_ms = 1e-6 / steps
    return {
        "span": span * per_step_ms,
        "compute": computing * per_step_ms,
        "communication": talking * per_step_ms,
        "exposed_communication": (busy - computing) * per_step_ms,
        "idle": (span - busy) * per_step_ms,
    }
