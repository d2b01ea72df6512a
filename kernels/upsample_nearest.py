"""Nearest-neighbour 2x upsampling of channels_last images: the FLUX VAE decoder's three Upsample2D layers.

PyTorch's NHWC kernel (`upsample_nearest2d_nhwc_out_frame`) computes a source index per output value: 11.8 ms for
the three upsamplings of an eager 2048^2 decode on an H200, against 4.1 ms for the NCHW kernel and ~1.1 ms for the
4.4 GB they move at the card's bandwidth (benchmarks/NOTES.md 2026-11-30 22:22,
`results/profile-vae-chunked-h200-20261130-2231.json`). Here a program loads a tile of BLOCK_P input pixels with
all their channels (rows of C contiguous values) and stores it four times, at (2h + i, 2w + j): every load and store
a whole row. Exact: values are copied, never computed.

Takes [N, C, H, W] channels_last, C <= MAX_CHANNELS (else F.interpolate, `upsample_nearest2x_ref`). H200: the
three in 1.2 ms, from 11.8 (`results/profile-vae-eager-h200-20261201-0059.json`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import flux_kernels
from flux_kernels import device_guard, triton_interpreting, triton_runnable

TILE = 8192  # values a program loads (BLOCK_P pixels x BLOCK_C channels)
MAX_CHANNELS = 4096


@triton.jit
def _upsample_nearest2x_fwd_kernel(X, OUT, pixels, height, width, channels, BLOCK_P: tl.constexpr,
                                   BLOCK_C: tl.constexpr):  # fmt: skip
    pixel = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # over N * H * W input pixels
    cols = tl.arange(0, BLOCK_C)
    mask = (pixel < pixels)[:, None] & (cols < channels)[None, :]
    x = tl.load(X + pixel[:, None] * channels + cols[None, :], mask=mask)
    sample = pixel // (height * width)
    row = (pixel // width) % height
    col = pixel % width
    top_left = (sample * 2 * height + 2 * row) * 2 * width + 2 * col  # output pixel (2h, 2w)
    for dy in tl.static_range(2):
        for dx in tl.static_range(2):
            target = top_left + dy * 2 * width + dx
            tl.store(OUT + target[:, None] * channels + cols[None, :], x, mask=mask)


def runs_here(x: torch.Tensor) -> bool:
    """Whether the kernel takes x: a 4D channels_last tensor (not also contiguous) of at most MAX_CHANNELS
    channels, on a CUDA GPU or on the CPU under the Triton interpreter."""
    if x.dim() != 4 or x.numel() == 0 or x.shape[1] > MAX_CHANNELS:
        return False
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    return x.is_cuda or (x.device.type == "cpu" and triton_interpreting() and triton_runnable(x.device))


def upsample_nearest2x_fwd(x: torch.Tensor) -> torch.Tensor:
    """F.interpolate(x, scale_factor=2.0, mode="nearest") by the kernel, channels_last out; x must satisfy
    `runs_here`."""
    batch, channels, height, width = x.shape
    out = torch.empty(batch, channels, 2 * height, 2 * width, dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)  # fmt: skip
    if flux_kernels.POISON_OUTPUTS:
        out.fill_(float("nan") if out.is_floating_point() else torch.iinfo(out.dtype).max)
    block_c = triton.next_power_of_2(channels)
    block_p = max(1, TILE // block_c)
    pixels = batch * height * width
    with device_guard(x):
        _upsample_nearest2x_fwd_kernel[(triton.cdiv(pixels, block_p),)](
            x, out, pixels, height, width, channels, BLOCK_P=block_p, BLOCK_C=block_c
        )
    return out


def upsample_nearest2x_ref(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest 2x upsampling by the kernel where `runs_here(x)`, else F.interpolate."""
    if torch.compiler.is_compiling() or not runs_here(x):
        return upsample_nearest2x_ref(x)
    return upsample_nearest2x_fwd(x)


__all__ = ["runs_here", "upsample_nearest2x", "upsample_nearest2x_fwd", "upsample_nearest2x_ref"]
