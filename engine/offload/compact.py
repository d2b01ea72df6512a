"""Compaction: a resident component's weights re-laid into one device buffer (quantising on the GPU leaves them in
half-used allocator segments)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import ConfigError
from .policies import OffloadState
from .streamer import HostBuffer, PackedUnit, module_tensors

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- compaction


def compact(module: nn.Module, device: torch.device) -> bool:
    """Re-lay `module`'s device tensors into one contiguous device buffer (through host memory).

    Quantising on the GPU frees the bf16 weights piece by piece, and the new weights land in the holes: the
    allocator's segments end up part live, part free, and cannot be handed back. Measured under a 24 GiB cap
    (fp8 transformer + fp8 T5 resident, 2048^2): 16.3 GiB live, 8.8 GiB stuck free, out of memory. One buffer
    per component leaves no holes. Storage sharing (fused QKV views, tied embeddings) is kept.
    Returns False (and leaves the module as it is) for tensor subclasses it cannot re-lay (quanto)."""
    try:
        tensors = module_tensors(module)
    except ConfigError:
        return False
    if not tensors or any(t.device != device for _, _, _, t in tensors):
        return False
    unit = PackedUnit(type(module).__name__, tensors)
    del tensors
    host = HostBuffer.pack([unit], pin=False)  # the device copies are freed here
    if device.type == "cuda":
        torch.cuda.empty_cache()
    resident = torch.empty(unit.nbytes, dtype=torch.uint8, device=device)
    resident.copy_(host.tensor)
    unit.assign(unit.views(resident))
    return True


def compact_resident(pipe, state: OffloadState | None, device: torch.device) -> list[str]:
    """compact() every quantisable component that lives whole on the device (not streamed, not visiting)."""
    streamed = set(state.streamers) | set(state.on_demand) if state is not None else set()
    done = []
    for name in ("transformer", "text_encoder_2", "text_encoder"):
        module = getattr(pipe, name, None)
        if module is not None and name not in streamed and compact(module, device):
            done.append(name)
    return done
