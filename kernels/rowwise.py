"""What the row-wise kernels share (qk_norm_rope, layernorm_modulate and its variants, gelu_concat_fp8): the
activation dtypes they take, the input checks that raise with the fix in the message, the autotune config
switch for the interpreter, and the batch / token strides of a [B, L, W] input.
"""

from __future__ import annotations

import torch
import triton

from flux_kernels import triton_interpreting

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_CHANNELS = 16384


def check_last_dim_contiguous(op: str, name: str, x: torch.Tensor) -> None:
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ValueError(f"{op}: {name} has stride {x.stride(-1)} in its last dim; it must be 1 (call .contiguous())")


def check_floating(op: str, name: str, x: torch.Tensor, device: torch.device) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{op}: {name} has dtype {x.dtype}; expected a floating dtype")
    if x.device != device:
        raise ValueError(f"{op}: {name} is on {x.device} but the activations are on {device}; use one device")


def check_activation(op: str, name: str, x: torch.Tensor, ndim: int, layout: str) -> None:
    if x.dim() != ndim:
        raise ValueError(f"{op}: {name} has shape {tuple(x.shape)}; expected {ndim} dims {layout}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(
            f"{op}: {name} has dtype {x.dtype}; allowed: bfloat16, float16, float32 (cast with .to(torch.bfloat16))"
        )
    check_last_dim_contiguous(op, name, x)


def configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    # One config under the interpreter: the autotuner skips its timing runs only for a list of one.
    return [interpreter] if triton_interpreting() else gpu


def batch_token_strides(x: torch.Tensor) -> tuple[int, int]:
    """(batch, token) strides of [B, L, W], those of size-1 dims replaced by values that are never stepped
    along but keep both segments' strides the same integer type in the kernel (a stride of 1 would become
    a compile-time constant)."""
    batch, tokens, width = x.shape
    return (x.stride(0) if batch > 1 else 0, x.stride(1) if tokens > 1 else width)


__all__ = [
    "ACTIVATION_DTYPES",
    "MAX_CHANNELS",
    "batch_token_strides",
    "check_activation",
    "check_floating",
    "check_last_dim_contiguous",
    "configs",
]
