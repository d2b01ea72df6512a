"""One pipeline call's GPU kernel time per kernel name, from torch.profiler (shared by the profile_* scripts)."""

from __future__ import annotations

from collections import defaultdict

import torch


def kernel_times(pipe, height: int, width: int, steps: int) -> dict[str, tuple[float, int]]:
    """{kernel name (100 characters): (ms per step, launches per step)} of one call, after a warm-up call."""

    def call():
        pipe("a photograph of an astronaut", height=height, width=width, num_inference_steps=steps,
             generator=torch.Generator().manual_seed(0), output_type="latent")  # fmt: skip

    call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    found: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us > 0:
            found[event.key[:100]][0] += device_us / 1e3 / steps
            found[event.key[:100]][1] += event.count // steps
    return {name: (ms, count) for name, (ms, count) in found.items()}
