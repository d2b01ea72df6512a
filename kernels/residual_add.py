"""The end of a VAE ResnetBlock2D in one pass: (shortcut + h + bias[c]) / divisor, h being the second convolution's
output without its bias.

PyTorch's cuDNN convolution adds its bias in a separate pass, and for channels_last outputs that pass is a
non-vectorised broadcast (`elementwise_kernel<128, 4>`): the FLUX VAE's 35 bias adds took 23.9 of the eager 2048^2
decode's 137.9 ms on an H200, then diffusers' `(input_tensor + hidden_states) / output_scale_factor` two more passes
(4.1 + 2.8 ms; benchmarks/NOTES.md 2026-11-30 22:22, `results/profile-vae-chunked-h200-20261130-2231.json`). Here
the second convolution's bias (and the 1x1 shortcut convolution's, summed) is added where the residual is: one
read of each input, one write, in fp32 and rounded once to the output dtype (diffusers rounds after the bias, the
sum and the division). The first convolution's bias goes to the GroupNorm after it (flux_kernels.group_norm's
`input_bias`).

Layouts: same shape and strides, contiguous or channels_last; else (or a CPU without the interpreter) the ref. H200,
2048^2: 14 sums 4.6 ms, bias adds 23.9 -> 6.1 ms (`results/profile-vae-eager-h200-20261201-0059.json`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import flux_kernels
from flux_kernels import device_guard, triton_interpreting, triton_runnable

BLOCK = 4096  # values a program


@triton.jit
def _residual_add_fwd_kernel(H, SHORTCUT, BIAS, OUT, numel, channels, spatial, divisor, BLOCK: tl.constexpr,
                             CHANNELS_LAST: tl.constexpr):  # fmt: skip
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    if CHANNELS_LAST:
        channel = offsets % channels
    else:
        channel = (offsets // spatial) % channels
    h = tl.load(H + offsets, mask=mask, other=0.0).to(tl.float32)
    shortcut = tl.load(SHORTCUT + offsets, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(BIAS + channel, mask=mask, other=0.0)
    tl.store(OUT + offsets, ((shortcut + h + bias) / divisor).to(OUT.dtype.element_ty), mask=mask)


def _layout(x: torch.Tensor) -> str | None:
    if x.is_contiguous():
        return "contiguous"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return None


def runs_here(h: torch.Tensor, shortcut: torch.Tensor) -> bool:
    """Whether the kernel takes h and shortcut: float [N, C, *spatial] tensors of one shape, dtype and strides,
    contiguous or channels_last, on a CUDA GPU or on the CPU under the Triton interpreter."""
    if h.dim() < 3 or not h.is_floating_point() or h.numel() == 0:
        return False
    if shortcut.shape != h.shape or shortcut.dtype != h.dtype or shortcut.stride() != h.stride():
        return False
    if _layout(h) is None or shortcut.device != h.device:
        return False
    return h.is_cuda or (h.device.type == "cpu" and triton_interpreting() and triton_runnable(h.device))


def residual_add_fwd(h: torch.Tensor, shortcut: torch.Tensor, bias: torch.Tensor, divisor: float = 1.0,
                     out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(shortcut + h + bias[c]) / divisor by the kernel; h and shortcut must satisfy `runs_here`. `out` (h itself,
    say: the caller's temporary) receives the result, else a new tensor in h's layout."""
    channels = h.shape[1]
    if bias.shape != (channels,):
        raise ValueError(f"residual_add: bias of shape {tuple(bias.shape)}, expected ({channels},)")
    if divisor == 0:
        raise ValueError("residual_add: divisor 0; diffusers' output_scale_factor must be non-zero")
    if out is None:
        out = torch.empty_like(h)
        if flux_kernels.POISON_OUTPUTS:
            out.fill_(float("nan"))
    elif out.shape != h.shape or out.stride() != h.stride() or out.dtype != h.dtype:
        raise ValueError("residual_add: out must have h's shape, strides and dtype")
    numel = h.numel()
    with device_guard(h):
        _residual_add_fwd_kernel[(triton.cdiv(numel, BLOCK),)](
            h,
            shortcut,
            bias.float().contiguous(),
            out,
            numel,
            channels,
            h[0, 0].numel(),
            float(divisor),
            BLOCK=BLOCK,
            CHANNELS_LAST=_layout(h) == "channels_last",
        )
    return out


def residual_add_ref(h: torch.Tensor, shortcut: torch.Tensor, bias: torch.Tensor, divisor: float = 1.0):
    """diffusers' order of PyTorch ops: the bias (the convolution's), the residual sum, the division, each rounded
    to h's dtype."""
    h = h + bias.to(h.dtype).view(1, -1, *([1] * (h.dim() - 2)))
    return (shortcut + h) / divisor


def residual_add(h: torch.Tensor, shortcut: torch.Tensor, bias: torch.Tensor, divisor: float = 1.0,
                 out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(shortcut + h + bias[c]) / divisor in one pass where `runs_here(h, shortcut)`, else `residual_add_ref`."""
    if torch.compiler.is_compiling() or not runs_here(h, shortcut):
        return residual_add_ref(h, shortcut, bias, divisor)
    return residual_add_fwd(h, shortcut, bias, divisor, out)


__all__ = ["residual_add", "residual_add_fwd", "residual_add_ref", "runs_here"]
