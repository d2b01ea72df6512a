"""diffusers' IP-Adapter scales as compiled blocks and captured CUDA graphs read them.

FluxIPAdapterAttnProcessor multiplies each adapter's attention output by `processor.scale[i]`, a Python float that
`set_ip_adapter_scale` writes (a new list each time, a value per block for a per-block ramp). The compiled regions
trace with `specialize_float` (engine.compile.dynamo_settings), so each float was a constant: every new value
recompiled the blocks, and after eight the compile failed (`FailOnRecompileLimitHit`), as did a per-block ramp at its
first call; a CUDA graph captured over diffusers' blocks would replay the captured values. Before each forward the
floats are copied into fp32 0-dim tensors kept per processor (the same objects each call, on the adapter's device):
dynamo reads them as inputs, a graph reads them from memory at each replay. Inductor multiplies by an fp32 scalar
either way, so a compiled block computes what it did with the float; `remove` puts the floats back.
"""

from __future__ import annotations

import torch
from torch import nn

KEPT = "_engine_ip_scale_tensors"  # on an IP-Adapter processor: its scales' tensors and floats, by position


class IpAdapterScales:
    """The forward pre-hook that keeps `model`'s IP-Adapter scales as tensors (module docstring); `remove()` undoes."""

    def __init__(self, model: nn.Module):
        self.attention = [module for module in model.modules() if hasattr(module, "get_processor")]
        self.handle = model.register_forward_pre_hook(self._before_forward)

    def _processors(self):
        for module in self.attention:
            processor = module.processor
            if type(processor).__name__ == "FluxIPAdapterAttnProcessor" and isinstance(processor.scale, list):
                yield processor

    def _before_forward(self, module, args) -> None:
        for processor in self._processors():
            kept = processor.__dict__.setdefault(KEPT, {})  # position -> (tensor, the float written into it)
            device = processor.to_k_ip[0].weight.device
            for index, value in enumerate(processor.scale):
                if isinstance(value, torch.Tensor):
                    continue  # ours from the last call, or a tensor the caller chose
                tensor = kept.get(index, (None, None))[0]
                if tensor is None or tensor.device != device:  # the first call, or the adapter moved
                    tensor = torch.empty((), dtype=torch.float32, device=device)
                tensor.fill_(float(value))
                kept[index] = (tensor, value)
                processor.scale[index] = tensor

    def remove(self) -> None:
        self.handle.remove()
        for processor in self._processors():
            kept = processor.__dict__.pop(KEPT, {})
            for index, value in enumerate(processor.scale):
                tensor, written = kept.get(index, (None, None))
                if tensor is not None and value is tensor:
                    processor.scale[index] = written  # the float as the caller set it
