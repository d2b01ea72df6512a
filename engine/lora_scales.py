"""The adapters' scales as the compiled blocks and captured CUDA graphs read them (the LoRA calls' care:
engine/lora_calls.py).

Under compile every adapter scale is a 0-dim tensor that stays the same object for an adapter (`scalings_as_tensors`):
dynamo reads it as an input (a float would be a constant, recompiled for each new value), and a captured graph reads
it from device memory at each replay. What PEFT and diffusers write into `layer.scaling` (floats from `set_adapters`
or `set_scale`, and a NEW tensor from PEFT's `unscale_layer` after every call with `joint_attention_kwargs={"scale":
s}`, whose `scale_layer` had multiplied the kept tensor in place) is copied back into that tensor; before, the graphs
went on replaying the kept tensor at s times its value (H200, 2026-12-03: the next plain call ran the adapter at half
strength after a 0.5 call, without a word).
"""

from __future__ import annotations

import torch
from torch import nn

from .lora import is_lora_layer

SCALING_TENSORS = "_engine_scaling_tensors"  # a PEFT layer's scale tensors by adapter, kept across writes
LORA_LAYERS = "_engine_lora_layers"  # on the transformer: its PEFT layers when scalings_as_tensors last ran


def scalings_as_tensors(transformer: nn.Module) -> None:
    """Every adapter scale becomes (or goes back into) a 0-dim float64 tensor beside the adapter's factors, the same
    tensor for an adapter each time: a float is written into it, and so is a tensor PEFT put in its place (a tensor
    on another device, after the factors moved, is taken as the adapter's tensor instead).

    float64 keeps PEFT's float arithmetic when diffusers scales and unscales it; the engine's updates multiply in
    fp32 as with a float (engine.lora_update.scaled). PEFT's own forward (compiled presets without the engine's fused
    blocks) rounds a tensor scale to the activations' dtype first, as it does under enable_lora_hotswap: at most
    2^-9 of the update."""
    layers = transformer.__dict__[LORA_LAYERS] = [m for m in transformer.modules() if is_lora_layer(m)]
    for layer in layers:
        kept = layer.__dict__.setdefault(SCALING_TENSORS, {})
        for name, value in layer.scaling.items():
            tensor = kept.get(name)
            if value is tensor:
                continue
            if isinstance(value, torch.Tensor) and (tensor is None or tensor.device != value.device):
                kept[name] = value  # PEFT's own tensor (enable_lora_hotswap), or the factors moved
                continue
            if tensor is None:
                factors = layer.lora_A[name] if name in layer.lora_A else layer.get_base_layer()
                device = next(factors.parameters()).device
                tensor = kept[name] = torch.zeros((), dtype=torch.float64, device=device)
            if isinstance(value, torch.Tensor):
                tensor.copy_(value)
            else:
                tensor.fill_(value)
            layer.scaling[name] = tensor


def scales_are_tensors(transformer: nn.Module) -> bool:
    """Whether every adapter scale is a tensor in device memory, which captured CUDA graphs read at each replay (a
    host tensor's value is baked into the graph as a float is)."""
    layers = [m for m in transformer.modules() if is_lora_layer(m)]
    return all(
        isinstance(value, torch.Tensor) and value.device.type != "cpu"
        for layer in layers
        for value in layer.scaling.values()
    )


def layer_states(layers: list) -> tuple:
    """What of each PEFT layer decides what it computes, short of its factors' values: its merges, whether its
    adapters are disabled, which act, and its scales (a float's value; a tensor by identity, as the graphs read it).
    Changed past the engine's wrapped methods (a layer's own set_adapter / enable_adapters / set_scale), the next
    forward settles them (engine.lora_calls._changed_past_the_methods). ~0.3 us a layer."""
    return tuple(
        (
            len(layer.merged_adapters),
            layer.disable_adapters,
            str(layer.active_adapter),
            tuple(value if type(value) is float else id(value) for value in layer.scaling.values()),
        )
        for layer in layers
    )
