"""GroupNorm of NCHW activations with its statistics split over many programs: the FLUX VAE's 30 GroupNorms.

PyTorch's CUDA GroupNorm reduces each (sample, group) in one thread block (RowwiseMomentsCUDAKernel): a batch of one
with 32 groups keeps 32 of an H200's 132 SMs busy, and at 2048^2 each group of the last decoder stage holds 16.8M
values. Its statistics took 186 of the eager 2048^2 decode's 397 ms (46 of 87 at 1024^2; benchmarks/NOTES.md
2026-11-30 23:00, `results/profile-vae-h200-20261130-2152.json`). Here each group is cut into chunks, one program
per (group, chunk), so every SM reads:
1. `_group_moments_kernel`: per (group, chunk), the sum and the sum of squares of x - shift in fp32, shift being
   the group's first value (the shifted-data variance: no cancellation when the mean is large against the spread);
2. the chunks' partial sums added in fp32 (PyTorch, [groups, chunks]), then mean and 1 / sqrt(var + eps), folded
   with the affine weight and bias into one scale and one shift per channel;
3. `_group_norm_apply_kernel`: y = x * scale[c] + shift[c] in fp32, rounded once to x's dtype.
The same arithmetic as PyTorch's up to the summation order (its Welford in one block): outputs within a few units
of the output dtype's last place (the tests compare against F.group_norm).
Contiguous NCHW inputs of any float dtype; anything else (channels_last, CPU without the interpreter) is for
F.group_norm, which `group_norm` calls then. Eager only: under torch.compile inductor fuses GroupNorm with its
neighbours itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from flux_kernels import device_guard, new_output, triton_interpreting, triton_runnable

CHUNK = 16384  # values a program reduces; at 2048^2 the last stage's 16.8M-value groups make 1024 programs each
BLOCK = 2048  # values a program loads at a time


@triton.jit
def _group_moments_kernel(X, PARTIAL, group_size, chunks, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    group = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    base = X + group * group_size
    shift = tl.load(base).to(tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    squares = tl.zeros([BLOCK], dtype=tl.float32)
    start = chunk.to(tl.int64) * CHUNK
    for offset in range(0, CHUNK, BLOCK):
        cols = start + offset + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < group_size, other=0.0).to(tl.float32)
        x = tl.where(cols < group_size, x - shift, 0.0)
        total += x
        squares += x * x
    out = PARTIAL + (group * chunks + chunk) * 2
    tl.store(out, tl.sum(total, axis=0))
    tl.store(out + 1, tl.sum(squares, axis=0))


@triton.jit
def _group_norm_apply_kernel(X, SCALE, SHIFT, OUT, spatial, BLOCK: tl.constexpr):
    channel = tl.program_id(0).to(tl.int64)  # over batch x channels
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < spatial
    x = tl.load(X + channel * spatial + cols, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.load(SCALE + channel) + tl.load(SHIFT + channel)
    tl.store(OUT + channel * spatial + cols, y.to(OUT.dtype.element_ty), mask=mask)


def runs_here(x: torch.Tensor) -> bool:
    """Whether the kernels take x: a contiguous NCHW (or [N, C, ...]) float tensor on a CUDA GPU, or on the CPU
    under the Triton interpreter."""
    if x.dim() < 3 or not x.is_floating_point() or not x.is_contiguous() or x.numel() == 0:
        return False
    return x.is_cuda or (x.device.type == "cpu" and triton_interpreting() and triton_runnable(x.device))


def group_norm_fwd(x: torch.Tensor, num_groups: int, weight, bias, eps: float) -> torch.Tensor:
    """F.group_norm(x, num_groups, weight, bias, eps) by the kernels above; x must satisfy `runs_here`."""
    batch, channels = x.shape[:2]
    if channels % num_groups:
        raise ValueError(f"group_norm: {channels} channels do not split into {num_groups} groups")
    spatial = x[0, 0].numel()
    group_size = channels // num_groups * spatial
    chunks = triton.cdiv(group_size, CHUNK)
    partial = torch.empty(batch * num_groups, chunks, 2, dtype=torch.float32, device=x.device)
    with device_guard(x):
        _group_moments_kernel[(batch * num_groups, chunks)](x, partial, group_size, chunks, CHUNK=CHUNK, BLOCK=BLOCK)
    sums = partial.sum(dim=1)  # [groups, 2]: the shifted sum and sum of squares
    shifted_mean = sums[:, 0] / group_size
    variance = (sums[:, 1] / group_size - shifted_mean * shifted_mean).clamp(min=0.0)
    mean = shifted_mean + x.view(batch * num_groups, group_size)[:, 0].float()
    rstd = torch.rsqrt(variance + eps)
    per_channel = channels // num_groups
    mean = mean.view(batch, num_groups, 1).expand(batch, num_groups, per_channel).reshape(batch, channels)
    rstd = rstd.view(batch, num_groups, 1).expand(batch, num_groups, per_channel).reshape(batch, channels)
    scale = rstd if weight is None else rstd * weight.float()
    shift = -mean * scale if bias is None else bias.float() - mean * scale
    out = new_output(*x.shape, dtype=x.dtype, device=x.device)
    with device_guard(x):
        _group_norm_apply_kernel[(batch * channels, triton.cdiv(spatial, BLOCK))](
            x, scale.contiguous(), shift.contiguous(), out, spatial, BLOCK=BLOCK
        )
    return out


def group_norm(x: torch.Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """F.group_norm with the statistics split over many programs where `runs_here(x)`, else F.group_norm itself."""
    if torch.compiler.is_compiling() or not runs_here(x):
        return F.group_norm(x, num_groups, weight, bias, eps)
    return group_norm_fwd(x, num_groups, weight, bias, eps)


__all__ = ["group_norm", "group_norm_fwd", "runs_here"]
