"""The host-to-device copy bandwidth, pinned and pageable, measured on this machine."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- host-to-device bandwidth


def measure_h2d_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Pinned host -> device copy bandwidth (GB/s, median of `repeats`) and pageable for comparison."""
    if device.type != "cuda":
        return {}
    result = {}
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for label, pinned in (("pinned", True), ("pageable", False)):
        source = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        times = []
        for _ in range(repeats + 1):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(source, non_blocking=pinned)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        median = sorted(times[1:])[len(times[1:]) // 2]
        result[f"{label}_GBps"] = round(nbytes / median / 1e9, 2)
    result["bytes"] = nbytes
    return result
