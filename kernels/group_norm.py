"""GroupNorm of [N, C, *spatial] activations with its statistics split over many programs: the FLUX VAE's 30
GroupNorms.

PyTorch's CUDA GroupNorm reduces each (sample, group) in one thread block (RowwiseMomentsCUDAKernel): a batch of one
with 32 groups keeps 32 of an H200's 132 SMs busy, and at 2048^2 each group of the last decoder stage holds 16.8M
values. Its statistics took 186 of the eager 2048^2 decode's 397 ms (46 of 87 at 1024^2; benchmarks/NOTES.md
2026-11-30 21:50, `results/profile-vae-h200-20261130-2152.json`). Here the work is cut into chunks, one program
per chunk, so every SM reads. Two layouts:
- contiguous (NCHW): `_group_moments_kernel`, per (group, chunk of CHUNK values), the sum and the sum of squares of
  x - shift in fp32, shift being the group's first value (the shifted-data variance: no cancellation when the mean
  is large against the spread); the chunks' sums added in fp32; then `_group_norm_apply_kernel`;
- channels innermost (channels_last; the VAE attention's [B, C, L] views): `_channel_moments_kernel`, per (sample,
  chunk of pixels), whole rows of C values a load (a group's few channels alone would use a quarter of each memory
  sector), each channel's shifted sums; the channels of a group combined in fp64 as parallel variances; then
  `_channels_last_apply_kernel`.
Both end with y = x * scale[c] + shift[c] in fp32 (mean, 1 / sqrt(var + eps), weight and bias folded into one scale
and shift per channel), rounded once to x's dtype, in x's layout. Two fusions for the VAE's ResnetBlock2D
(engine/vae_kernels.py): `input_bias`, the bias of the convolution before the norm, which then runs without it (a
separate pass in PyTorch): added to x where the statistics read it (contiguous) or to each channel's mean
(channels innermost: a per-channel shift moves nothing else), and into `shift`; `silu`, the activation after the
norm, applied before the one rounding. The same arithmetic as PyTorch's up to the
summation order (its Welford in one block): within a unit of the output dtype's last place (tests: F.group_norm).
Other layouts, and a CPU without the interpreter, go to F.group_norm (`group_norm` calls it then). Eager only: under
torch.compile inductor fuses GroupNorm with its neighbours itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import flux_kernels
from flux_kernels import device_guard, triton_interpreting, triton_runnable

CHUNK = 16384  # values a program reduces; at 2048^2 the last stage's 16.8M-value groups make 1024 programs each
BLOCK = 2048  # values a program loads at a time
# channels innermost: rows of C values, a tile of TILE values a load, CHANNELS_CHUNK values a program
TILE = 4096
CHANNELS_CHUNK = 131072
MAX_CHANNELS = 4096


@triton.jit
def _group_moments_kernel(X, INPUT_BIAS, PARTIAL, group_size, chunks, spatial, groups, per_channel,
                          CHUNK: tl.constexpr, BLOCK: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr):  # fmt: skip
    program = tl.program_id(0).to(tl.int64)  # a 1D grid: (group, chunk) flattened
    group = program // chunks
    chunk = program % chunks
    base = X + group * group_size
    first_channel = (group % groups) * per_channel
    shift = tl.load(base).to(tl.float32)
    if HAS_INPUT_BIAS:
        shift += tl.load(INPUT_BIAS + first_channel).to(tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    squares = tl.zeros([BLOCK], dtype=tl.float32)
    start = chunk.to(tl.int64) * CHUNK
    for offset in range(0, CHUNK, BLOCK):
        cols = start + offset + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < group_size, other=0.0).to(tl.float32)
        if HAS_INPUT_BIAS:
            channel = first_channel + cols // spatial
            x += tl.load(INPUT_BIAS + channel, mask=cols < group_size, other=0.0).to(tl.float32)
        x = tl.where(cols < group_size, x - shift, 0.0)
        total += x
        squares += x * x
    out = PARTIAL + (group * chunks + chunk) * 2
    tl.store(out, tl.sum(total, axis=0))
    tl.store(out + 1, tl.sum(squares, axis=0))


@triton.jit
def _group_norm_apply_kernel(X, SCALE, SHIFT, OUT, spatial, blocks, BLOCK: tl.constexpr, SILU: tl.constexpr):
    program = tl.program_id(0).to(tl.int64)  # a 1D grid: (sample x channel, block of BLOCK values) flattened
    channel = program // blocks
    cols = (program % blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < spatial
    x = tl.load(X + channel * spatial + cols, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.load(SCALE + channel) + tl.load(SHIFT + channel)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(OUT + channel * spatial + cols, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _channel_moments_kernel(X, PARTIAL, spatial, C, chunks, LOOPS: tl.constexpr, BLOCK_P: tl.constexpr,
                            BLOCK_C: tl.constexpr):  # fmt: skip
    """Channels innermost ([N, *spatial, C] memory): per (sample, chunk of pixels), each channel's sum and sum of
    squares of x - shift, shift being the channel's value at the first pixel; whole rows of C values a load."""
    program = tl.program_id(0).to(tl.int64)  # a 1D grid: (sample, chunk) flattened
    sample = program // chunks
    chunk = program % chunks
    base = X + sample * spatial * C
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    shift = tl.load(base + cols, mask=col_mask, other=0.0).to(tl.float32)
    total = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    squares = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for step in range(LOOPS):
        pixels = (chunk * LOOPS + step) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = (pixels < spatial)[:, None] & col_mask[None, :]
        x = tl.load(base + pixels[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x - shift[None, :], 0.0)
        total += x
        squares += x * x
    out = PARTIAL + (sample * chunks + chunk) * 2 * C  # [N, chunks, 2, C]
    tl.store(out + cols, tl.sum(total, axis=0), mask=col_mask)
    tl.store(out + C + cols, tl.sum(squares, axis=0), mask=col_mask)


@triton.jit
def _channels_last_apply_kernel(X, SCALE, SHIFT, OUT, spatial, C, blocks, BLOCK_P: tl.constexpr,
                                BLOCK_C: tl.constexpr, SILU: tl.constexpr):  # fmt: skip
    program = tl.program_id(0).to(tl.int64)  # a 1D grid: (sample, block of BLOCK_P pixels) flattened
    sample = program // blocks
    pixels = (program % blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_C)
    mask = (pixels < spatial)[:, None] & (cols < C)[None, :]
    offsets = sample * spatial * C + pixels[:, None] * C + cols[None, :]
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + sample * C + cols, mask=cols < C, other=0.0)
    shift = tl.load(SHIFT + sample * C + cols, mask=cols < C, other=0.0)
    y = x * scale[None, :] + shift[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(OUT + offsets, y.to(OUT.dtype.element_ty), mask=mask)


def grid(*counts: int) -> tuple[int]:
    """One grid axis for all the programs (the x axis takes 2^31 - 1 of them; y and z only 65535: a 2048^2 image's
    NHWC apply made 131,072 blocks of pixels, past the y limit)."""
    programs = 1
    for count in counts:
        programs *= count
    if programs >= 2**31:
        raise ValueError(f"group_norm: {programs} programs, more than a CUDA grid takes (2^31 - 1); split the batch")
    return (programs,)


def channels_innermost(x: torch.Tensor) -> bool:
    """[N, C, *spatial] stored as [N, *spatial, C] (channels_last for 4D; the VAE attention's [B, C, L] views)."""
    return x.dim() >= 3 and x.stride(1) == 1 and x.movedim(1, -1).is_contiguous()


def runs_here(x: torch.Tensor) -> bool:
    """Whether the kernels take x: a float [N, C, *spatial] tensor, contiguous or channels innermost (at most
    MAX_CHANNELS of them), on a CUDA GPU, or on the CPU under the Triton interpreter."""
    if x.dim() < 3 or not x.is_floating_point() or x.numel() == 0:
        return False
    if not (x.is_contiguous() or (channels_innermost(x) and x.shape[1] <= MAX_CHANNELS)):
        return False
    return x.is_cuda or (x.device.type == "cpu" and triton_interpreting() and triton_runnable(x.device))


def group_norm_fwd(x: torch.Tensor, num_groups: int, weight, bias, eps: float, input_bias=None,
                   silu: bool = False) -> torch.Tensor:  # fmt: skip
    """F.group_norm(x + input_bias[c], num_groups, weight, bias, eps), then SiLU when `silu`, by the kernels above;
    x must satisfy `runs_here`. The output has x's layout. `input_bias` is the bias of the convolution before the
    norm (run without its own: a separate pass over the image in PyTorch's cuDNN path), added in fp32 where the
    values are read."""
    batch, channels = x.shape[:2]
    if channels % num_groups:
        raise ValueError(f"group_norm: {channels} channels do not split into {num_groups} groups")
    if input_bias is not None and input_bias.shape != (channels,):
        raise ValueError(f"group_norm: input_bias of shape {tuple(input_bias.shape)}, expected ({channels},)")
    spatial = x[0, 0].numel()
    per_channel = channels // num_groups
    if x.is_contiguous():
        mean, rstd = _moments_contiguous(x, num_groups, spatial, eps, input_bias)
    else:
        mean, rstd = _moments_channels_last(x, num_groups, spatial, eps, input_bias)
    mean = mean.view(batch, num_groups, 1).expand(batch, num_groups, per_channel).reshape(batch, channels)
    rstd = rstd.view(batch, num_groups, 1).expand(batch, num_groups, per_channel).reshape(batch, channels)
    scale = rstd if weight is None else rstd * weight.float()
    shift = -mean * scale if bias is None else bias.float() - mean * scale
    if input_bias is not None:  # (x + b) * scale + shift
        shift = shift + input_bias.float() * scale
    shift, scale = shift.contiguous(), scale.contiguous()
    out = torch.empty_like(x)  # x's strides
    if flux_kernels.POISON_OUTPUTS:
        out.fill_(float("nan"))
    with device_guard(x):
        if x.is_contiguous():
            blocks = triton.cdiv(spatial, BLOCK)
            _group_norm_apply_kernel[grid(batch * channels, blocks)](x, scale, shift, out, spatial, blocks, BLOCK=BLOCK,
                                                                     SILU=silu)  # fmt: skip
        else:
            block_c = triton.next_power_of_2(channels)
            block_p = max(1, TILE // block_c)
            blocks = triton.cdiv(spatial, block_p)
            _channels_last_apply_kernel[grid(batch, blocks)](
                x, scale, shift, out, spatial, channels, blocks, BLOCK_P=block_p, BLOCK_C=block_c, SILU=silu
            )
    return out


def _moments_contiguous(x, num_groups: int, spatial: int, eps: float, input_bias=None):
    """(mean, 1 / sqrt(var + eps)) per (sample, group), fp32 [N * G], of contiguous NCHW x (+ input_bias[c])."""
    per_channel = x.shape[1] // num_groups
    group_size = per_channel * spatial
    chunks = triton.cdiv(group_size, CHUNK)
    partial = torch.empty(x.shape[0] * num_groups, chunks, 2, dtype=torch.float32, device=x.device)
    with device_guard(x):
        _group_moments_kernel[grid(x.shape[0] * num_groups, chunks)](
            x,
            x if input_bias is None else input_bias,
            partial,
            group_size,
            chunks,
            spatial,
            num_groups,
            per_channel,
            CHUNK=CHUNK,
            BLOCK=BLOCK,
            HAS_INPUT_BIAS=input_bias is not None,
        )
    sums = partial.sum(dim=1)  # [groups, 2]: the shifted sum and sum of squares
    shifted_mean = sums[:, 0] / group_size
    variance = (sums[:, 1] / group_size - shifted_mean * shifted_mean).clamp(min=0.0)
    shift = x.view(x.shape[0] * num_groups, group_size)[:, 0].float()  # each group's first value
    if input_bias is not None:
        shift = shift + input_bias.float()[::per_channel].repeat(x.shape[0])
    return shifted_mean + shift, torch.rsqrt(variance + eps)


def _moments_channels_last(x, num_groups: int, spatial: int, eps: float, input_bias=None):
    """The same for x stored channels innermost: per channel first (each its own shift, its first pixel's value),
    then the channels of a group combined as parallel variances (Chan et al.): sum of the channels' squared
    deviations plus the pixels times the spread of the channels' means, in fp64 (a few hundred values). An input
    bias moves each channel's mean and nothing else."""
    batch, channels = x.shape[:2]
    block_c = triton.next_power_of_2(channels)
    block_p = max(1, TILE // 2 // block_c)  # two fp32 accumulators of the tile a program
    loops = max(1, CHANNELS_CHUNK // (block_p * block_c))
    chunks = triton.cdiv(spatial, block_p * loops)
    partial = torch.empty(batch, chunks, 2, channels, dtype=torch.float32, device=x.device)
    with device_guard(x):
        _channel_moments_kernel[grid(batch, chunks)](x, partial, spatial, channels, chunks, LOOPS=loops,
                                                     BLOCK_P=block_p, BLOCK_C=block_c)  # fmt: skip
    sums = partial.double().sum(dim=1)  # [N, 2, C]
    first = x.movedim(1, -1).reshape(batch, spatial, channels)[:, 0].double()
    channel_mean = first + sums[:, 0] / spatial
    if input_bias is not None:
        channel_mean = channel_mean + input_bias.double()
    channel_m2 = (sums[:, 1] - sums[:, 0] * sums[:, 0] / spatial).clamp(min=0.0)  # sum of squared deviations
    channel_mean = channel_mean.view(batch, num_groups, -1)
    mean = channel_mean.mean(dim=-1)
    m2 = channel_m2.view(batch, num_groups, -1).sum(dim=-1)
    m2 = m2 + spatial * ((channel_mean - mean[..., None]) ** 2).sum(dim=-1)
    variance = m2 / (spatial * (channels // num_groups))
    return mean.float().reshape(-1), torch.rsqrt(variance + eps).float().reshape(-1)


def group_norm_ref(x: torch.Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5, input_bias=None,
                   silu: bool = False) -> torch.Tensor:  # fmt: skip
    """The reference (and the fallback): PyTorch's ops, each rounding to x's dtype as diffusers' modules do."""
    if input_bias is not None:
        x = x + input_bias.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
    out = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(out) if silu else out


def group_norm(x: torch.Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5, input_bias=None,
               silu: bool = False) -> torch.Tensor:  # fmt: skip
    """F.group_norm (of x + input_bias[c], then SiLU when `silu`) with the statistics split over many programs
    where `runs_here(x)`, else `group_norm_ref`."""
    if torch.compiler.is_compiling() or not runs_here(x):
        return group_norm_ref(x, num_groups, weight, bias, eps, input_bias, silu)
    return group_norm_fwd(x, num_groups, weight, bias, eps, input_bias, silu)


__all__ = ["channels_innermost", "grid", "group_norm", "group_norm_fwd", "group_norm_ref", "runs_here"]
