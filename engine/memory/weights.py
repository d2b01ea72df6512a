"""Weight bytes: exact per quantisation mode from shapes (a meta-device model), and what a live module holds."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from ..config import QuantConfig
from ..errors import ConfigError
from ..quant.policy import COMPONENTS, NF4_BLOCK, QUANTO_MODES, quantizable_linears


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def nf4_layer_bytes(out_features: int, in_features: int, double_quant: bool) -> int:
    """Bytes bitsandbytes holds for one NF4 weight (bias not included), as bitsandbytes 0.50 allocates them:
    packed 4-bit values, per-64-block fp32 absmax (or, double-quantised, uint8 absmax + fp32 absmax per 256
    blocks + a 256-entry fp32 code + an fp32 offset), and the 16-entry fp32 NF4 code."""
    elements = out_features * in_features
    blocks = math.ceil(elements / NF4_BLOCK)
    packed = math.ceil(elements / 2)
    nf4_code = 16 * 4
    if double_quant:
        return packed + blocks + math.ceil(blocks / 256) * 4 + 256 * 4 + 4 + nf4_code
    return packed + blocks * 4 + nf4_code


def linear_weight_bytes(linear: nn.Linear, mode: str, double_quant: bool = False) -> int:
    """Bytes of one Linear (weight and bias) after quantising it with `mode`."""
    out_features, in_features = linear.out_features, linear.in_features
    bias = tensor_bytes(linear.bias) if linear.bias is not None else 0
    dtype_bytes = linear.weight.element_size()
    if mode == "none":
        return out_features * in_features * dtype_bytes + bias
    if mode == "fp8":
        return out_features * in_features + out_features * 4 + bias  # e4m3 + fp32 scale per row
    if mode in QUANTO_MODES:
        # 1-byte data + a scale per row in the weight's dtype + quanto's scalar input/output scales
        return out_features * in_features + out_features * dtype_bytes + 2 * dtype_bytes + bias
    if mode == "nf4":
        return nf4_layer_bytes(out_features, in_features, double_quant) + bias
    raise ConfigError(f"quantisation mode {mode!r} is not one of {', '.join(QuantConfig.MODES)}")


def weight_bytes(model: nn.Module, mode: str, component: str = "transformer", double_quant: bool = False) -> int:
    """Exact bytes of `model`'s weights once quantised with `mode` (build it on the meta device: no memory).

    The diffusers (unfused) layout; fusing QKV changes nothing for fp8 and int8/fp8-weight scales per
    row, and a few hundred bytes per fused layer for nf4's block padding and codes.
    """
    targets = dict(quantizable_linears(model, component)) if mode != "none" else {}
    total, seen = 0, set()
    for name, module in model.named_modules():
        if name in targets:
            total += linear_weight_bytes(module, mode, double_quant)
            seen.update(id(p) for p in module.parameters())
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total


def _leaf_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors behind a tensor subclass (quanto's QBytesTensor, its CUDA packed variants), recursively."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, nn.Parameter):
        yield tensor
        return
    for inner in flatten()[0]:
        yield from _leaf_tensors(getattr(tensor, inner))


def state_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor a module holds, quanto's inner tensors and bitsandbytes' quant states included."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        yield from _leaf_tensors(tensor)
        quant_state = getattr(tensor, "quant_state", None)
        while quant_state is not None:
            yield from (t for t in (quant_state.absmax, quant_state.code, quant_state.offset) if t is not None)
            quant_state = quant_state.state2


def actual_weight_bytes(model: nn.Module) -> int:
    """Bytes of the tensors `model` holds now, each storage counted once."""
    total, seen = 0, set()
    for tensor in state_tensors(model):
        try:
            key, nbytes = (tensor.device, tensor.untyped_storage().data_ptr()), tensor.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # meta tensors, storage-less wrappers
            key, nbytes = id(tensor), tensor_bytes(tensor)
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total


def meta_component(variant: str, component: str, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A pipeline component of `variant` on the meta device (shapes and dtypes, no memory)."""
    from ..models.builders import build_clip, build_t5, build_transformer, dtype_as_default
    from ..models.variants import variant_spec

    spec = variant_spec(variant)
    with torch.device("meta"), dtype_as_default(dtype):
        if component == "transformer":
            return build_transformer(spec)
        if component == "text_encoder_2":
            return build_t5(spec, dtype)
        if component == "text_encoder":
            return build_clip(spec, dtype)
        if component == "controlnet":  # a FLUX.1 ControlNet of the real layout for the variant (5 + 10 blocks)
            from diffusers import FluxControlNetModel

            from ..models.controlnet import controlnet_config

            return FluxControlNetModel(**controlnet_config(variant))
    raise ConfigError(f"component {component!r} is not one of {', '.join((*COMPONENTS, 'controlnet'))}")
