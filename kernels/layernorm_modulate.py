"""LayerNorm + adaLN modulation kernels of the FLUX blocks, each one pass over memory.

layernorm_modulate: LayerNorm (no affine, fp32 statistics) * (1 + scale) + shift (adaLN modulation).
gated_residual_layernorm_modulate: residual = x + gate * y, then layernorm_modulate(residual); reads x and
    y once and writes both results. Both: a row (or two) of C per program, the grid's second axis the batch,
    so the [C] modulation vectors load once per program.
*_fp8: the same ops with the normalised output quantised per token to e4m3 (+ fp32 scales) for the fp8 GEMM
    after them (flux_kernels.fp8's e4m3 helpers; quantize_fp8_rowwise is their reference).
Tuned for: FLUX hidden C = 3072 (one masked block of 4096), bf16, on H100 (L = 4608 / 16896). Eager calls launch
directly (custom ops `flux_kernels::layernorm_modulate`, `flux_kernels::gated_residual_layernorm_modulate` and
their `_fp8` variants only under torch.compile).
Limits: the last dim of every input must be contiguous (stride 1); C <= 16384; bf16, fp16 or fp32 activations.
Measured (H100 80GB HBM3, 2026-11-26, benchmarks/results/norm-h100-80gb-hbm3-20261126-1800.json; GB/s from
CUDA-graph device time, % of the 3001 GB/s copy ceiling): layernorm_modulate 2350 (78%) at (1, 4608, 3072) and
2647 (88%) at (1, 16896, 3072), torch.compile 1476 / 1536; gated_residual_layernorm_modulate 2607 (87%) / 2813
(94%), torch.compile 2314 / 2544.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from flux_kernels import check_runnable, device_guard, multiprocessor_count, new_output
from flux_kernels.fp8 import FP8_DTYPE, e4m3, e4m3_scale, quantize_fp8_rowwise
from flux_kernels.rowwise import (
    ACTIVATION_DTYPES,
    MAX_CHANNELS,
    check_activation,
    check_floating,
    check_last_dim_contiguous,
    configs,
)
from flux_kernels.tuning import TunedLaunch


def layernorm_modulate_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, upcast: bool = True
) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale[:, None]) + shift[:, None] as diffusers writes it (norm2 + modulation).
    x: [B, L, C], shift/scale: [B, C]. upcast=True computes in fp32 and returns fp32."""
    if upcast:
        x, shift, scale = x.float(), shift.float(), scale.float()
    normed = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return normed * (1 + scale[:, None]) + shift[:, None]


def gated_residual_layernorm_modulate_ref(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual = x + gate[:, None] * y; normed = layernorm_modulate_ref(residual, shift, scale).
    x, y: [B, L, C]; gate/shift/scale: [B, C]."""
    if upcast:
        x, y, gate = x.float(), y.float(), gate.float()
    residual = x + gate[:, None] * y
    return residual, layernorm_modulate_ref(residual, shift, scale, eps, upcast=upcast)


def layernorm_modulate_fp8_ref(x, shift, scale, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8_rowwise(layernorm_modulate_ref(x, shift, scale, eps)) of the fp32 result: (e4m3 [B, L, C],
    fp32 scales [B, L, 1])."""
    return quantize_fp8_rowwise(layernorm_modulate_ref(x, shift, scale, eps))


def gated_residual_layernorm_modulate_fp8_ref(x, y, gate, shift, scale, eps: float = 1e-6):
    """(residual fp32, e4m3 [B, L, C], fp32 scales [B, L, 1]) of gated_residual_layernorm_modulate_ref in fp32."""
    residual, normed = gated_residual_layernorm_modulate_ref(x, y, gate, shift, scale, eps)
    return (residual, *quantize_fp8_rowwise(normed))


@triton.jit
def _modulated_layernorm(x, shift, scale_plus_one, col_mask, C, eps):
    # x: [BLOCK_ROWS, BLOCK_C] fp32 with masked columns = 0; statistics in two passes, as torch does
    mean = tl.sum(x, axis=1) / C
    centered = tl.where(col_mask, x - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.sum(centered * centered, axis=1) / C + eps)
    return centered * rstd[:, None] * scale_plus_one + shift


@triton.jit
def _store_normed(OUT, OUT_SCALE, offsets, scale_offsets, out, mask, row_mask, QUANT_FP8: tl.constexpr):
    # out: [BLOCK_ROWS, BLOCK_C] fp32, masked columns 0 (so they do not move the amax)
    if QUANT_FP8:
        row_scale, inverse = e4m3_scale(tl.max(tl.abs(out), axis=1)[:, None])
        tl.store(OUT + offsets, e4m3(out, inverse, OUT.dtype.element_ty), mask=mask)
        tl.store(OUT_SCALE + scale_offsets, row_scale, mask=row_mask)
    else:
        tl.store(OUT + offsets, out.to(OUT.dtype.element_ty), mask=mask)


def _layernorm_config(rows: int, warps: int, programs_per_sm: int = 0, stages: int = 1) -> triton.Config:
    return triton.Config({"BLOCK_ROWS": rows, "PROGRAMS_PER_SM": programs_per_sm}, num_warps=warps, num_stages=stages)


# Rows of C = 3072 (BLOCK_C 4096, the last quarter masked). PROGRAMS_PER_SM = 0: one row block per program;
# > 0: a persistent grid of that many programs per SM per batch element, each loading the [C] modulation
# vectors once and looping over row blocks (stages 2: the next rows load while this one is normalised).
_LAYERNORM_CONFIGS = configs(
    [
        _layernorm_config(1, 4),  # gated_residual_layernorm_modulate's pick at L = 4608 and 16896
        _layernorm_config(1, 8),
        _layernorm_config(2, 8),  # layernorm_modulate's pick at L = 4608 and 16896
        _layernorm_config(1, 4, programs_per_sm=8, stages=2),  # persistent: within 1-3% of the best
        _layernorm_config(1, 4, programs_per_sm=16),
    ],
    # several rows per program (the interpreter's cost is per program) on a persistent grid, so CPU tests
    # run the loop too
    interpreter=_layernorm_config(16, 4, programs_per_sm=1),
)


def _prune_layernorm_configs(configs, named_args, **kwargs):
    # at most 32 fp32 values of one row tile per thread (more spills), and not under 4 (idle lanes)
    block_c = {**named_args, **kwargs}["BLOCK_C"]
    kept = [c for c in configs if 4 * 32 * c.num_warps <= c.kwargs["BLOCK_ROWS"] * block_c <= 32 * 32 * c.num_warps]
    return kept or configs[:1]


@triton.autotune(
    configs=_LAYERNORM_CONFIGS, key=["B", "L", "C"], prune_configs_by={"early_config_prune": _prune_layernorm_configs}
)
@triton.jit
def _layernorm_modulate_fwd_kernel(
    X,
    SHIFT,
    SCALE,
    OUT,
    OUT_SCALE,
    stride_x_b,
    stride_x_l,
    stride_shift_b,
    stride_scale_b,
    B,
    L,
    C,
    eps,
    BLOCK_C: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,
    QUANT_FP8: tl.constexpr,
):
    # grid: (row-block programs, B); every program stays in one batch element, so shift/scale load once
    batch = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)[None, :]
    col_mask = cols < C
    shift = tl.load(SHIFT + batch * stride_shift_b + cols, mask=col_mask, other=0.0).to(tl.float32)
    scale_plus_one = tl.load(SCALE + batch * stride_scale_b + cols, mask=col_mask, other=0.0).to(tl.float32) + 1.0
    x_rows = X + batch * stride_x_b
    out_offset = batch * L * C  # outputs are contiguous [B, L, C] (and [B, L, 1] scales)
    for block in tl.range(tl.program_id(0), tl.cdiv(L, BLOCK_ROWS), tl.num_programs(0)):
        rows = (block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)[:, None]
        mask = (rows < L) & col_mask
        x = tl.load(x_rows + rows * stride_x_l + cols, mask=mask, other=0.0, eviction_policy="evict_first")
        out = _modulated_layernorm(x.to(tl.float32), shift, scale_plus_one, col_mask, C, eps)
        _store_normed(OUT, OUT_SCALE, out_offset + rows * C + cols, batch * L + rows, out, mask, rows < L, QUANT_FP8)


@triton.autotune(
    configs=_LAYERNORM_CONFIGS, key=["B", "L", "C"], prune_configs_by={"early_config_prune": _prune_layernorm_configs}
)
@triton.jit
def _gated_residual_layernorm_modulate_fwd_kernel(
    X,
    Y,
    GATE,
    SHIFT,
    SCALE,
    RESIDUAL,
    OUT,
    OUT_SCALE,
    stride_x_b,
    stride_x_l,
    stride_y_b,
    stride_y_l,
    stride_gate_b,
    stride_shift_b,
    stride_scale_b,
    B,
    L,
    C,
    eps,
    BLOCK_C: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,
    QUANT_FP8: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)[None, :]
    col_mask = cols < C
    gate = tl.load(GATE + batch * stride_gate_b + cols, mask=col_mask, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + batch * stride_shift_b + cols, mask=col_mask, other=0.0).to(tl.float32)
    scale_plus_one = tl.load(SCALE + batch * stride_scale_b + cols, mask=col_mask, other=0.0).to(tl.float32) + 1.0
    x_rows = X + batch * stride_x_b
    y_rows = Y + batch * stride_y_b
    out_offset = batch * L * C  # outputs are contiguous [B, L, C]
    for block in tl.range(tl.program_id(0), tl.cdiv(L, BLOCK_ROWS), tl.num_programs(0)):
        rows = (block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)[:, None]
        mask = (rows < L) & col_mask
        x = tl.load(x_rows + rows * stride_x_l + cols, mask=mask, other=0.0, eviction_policy="evict_first")
        y = tl.load(y_rows + rows * stride_y_l + cols, mask=mask, other=0.0, eviction_policy="evict_first")
        residual = x.to(tl.float32) + gate * y.to(tl.float32)  # fp32; normalised before rounding: one rounding each
        out = _modulated_layernorm(residual, shift, scale_plus_one, col_mask, C, eps)
        out_offsets = out_offset + rows * C + cols
        tl.store(RESIDUAL + out_offsets, residual.to(RESIDUAL.dtype.element_ty), mask=mask)
        _store_normed(OUT, OUT_SCALE, out_offsets, batch * L + rows, out, mask, rows < L, QUANT_FP8)


def _row_grid(batch: int, tokens: int, device: torch.device):
    def grid(meta):
        blocks = triton.cdiv(tokens, meta["BLOCK_ROWS"])
        per_sm = meta["PROGRAMS_PER_SM"]
        return (min(blocks, per_sm * multiprocessor_count(device)) if per_sm else blocks, batch)

    return grid


def _check_modulation(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    check_floating(op, name, t, x.device)
    if t.shape != (x.shape[0], x.shape[2]):
        raise ValueError(
            f"{op}: {name} has shape {tuple(t.shape)}; expected [B, C] = [{x.shape[0]}, {x.shape[2]}] "
            "(one row of the adaLN embedding per batch element)"
        )
    check_last_dim_contiguous(op, name, t)


def _check_layernorm_inputs(op: str, x: torch.Tensor, **modulation: torch.Tensor) -> None:
    check_activation(op, "x", x, 3, "[B, L, C]")
    if min(x.shape) < 1:
        raise ValueError(f"{op}: x {tuple(x.shape)} is empty; need B, L, C >= 1")
    if x.shape[2] > MAX_CHANNELS:
        raise ValueError(f"{op}: C = {x.shape[2]} is above the {MAX_CHANNELS} one block holds; use the _ref op")
    for name, t in modulation.items():
        _check_modulation(op, name, t, x)


def _layernorm_fast_check(x: torch.Tensor, *modulation: torch.Tensor) -> bool:
    """True for a valid call, in few attribute reads; False sends it through the full checks (and their
    messages). Accepts nothing that _check_layernorm_inputs refuses."""
    shape = x.shape
    if len(shape) != 3 or x.dtype not in ACTIVATION_DTYPES or x.stride()[2] != 1:
        return False
    batch, tokens, channels = shape
    if batch < 1 or tokens < 1 or not 1 <= channels <= MAX_CHANNELS:
        return False
    device, rows = x.device, (batch, channels)
    for t in modulation:
        if t.shape != rows or t.stride()[1] != 1 or not t.is_floating_point() or t.device != device:
            return False
    return True


_launch_layernorm_modulate = TunedLaunch(_layernorm_modulate_fwd_kernel, tokens=(1,))
_launch_gated_residual_layernorm_modulate = TunedLaunch(_gated_residual_layernorm_modulate_fwd_kernel, tokens=(1,))


def _normed_outputs(x: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised output ([B, L, C] in x's dtype, or e4m3) and its per-token fp32 scales ([B, L, 1]; with
    fp8 off, a placeholder the kernel never touches)."""
    batch, tokens, channels = x.shape
    out = new_output(batch, tokens, channels, dtype=FP8_DTYPE if fp8 else x.dtype, device=x.device)
    return out, new_output(batch, tokens, 1, dtype=torch.float32, device=x.device) if fp8 else out


def layernorm_modulate_fwd(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, fp8: bool = False
):
    """Checks, allocates and launches; see layernorm_modulate (fp8: layernorm_modulate_fp8)."""
    if not _layernorm_fast_check(x, shift, scale):
        _check_layernorm_inputs("layernorm_modulate", x, shift=shift, scale=scale)
    if not x.is_cuda:
        check_runnable(x.device, "layernorm_modulate")
    batch, tokens, channels = x.shape
    out, out_scale = _normed_outputs(x, fp8)
    x_strides, key = x.stride(), (batch, tokens, channels, x.dtype, shift.dtype, scale.dtype, fp8)
    with device_guard(x):
        _launch_layernorm_modulate(
            key, _row_grid(batch, tokens, x.device),
            x, shift, scale, out, out_scale, x_strides[0], x_strides[1], shift.stride()[0], scale.stride()[0],
            batch, tokens, channels, eps, BLOCK_C=triton.next_power_of_2(channels), QUANT_FP8=fp8,
        )  # fmt: skip
    return (out, out_scale) if fp8 else out


@torch.library.custom_op("flux_kernels::layernorm_modulate", mutates_args=())
def _layernorm_modulate_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    return layernorm_modulate_fwd(x, shift, scale, eps)


@_layernorm_modulate_op.register_fake
def _layernorm_modulate_fake(x, shift, scale, eps=1e-6):
    _check_layernorm_inputs("layernorm_modulate", x, shift=shift, scale=scale)
    return x.new_empty(x.shape)


@torch.library.custom_op("flux_kernels::layernorm_modulate_fp8", mutates_args=())
def _layernorm_modulate_fp8_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    return layernorm_modulate_fwd(x, shift, scale, eps, fp8=True)


@_layernorm_modulate_fp8_op.register_fake
def _layernorm_modulate_fp8_fake(x, shift, scale, eps=1e-6):
    _check_layernorm_inputs("layernorm_modulate_fp8", x, shift=shift, scale=scale)
    return x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty((*x.shape[:2], 1), dtype=torch.float32)


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm(x, no affine, fp32 statistics) * (1 + scale[:, None]) + shift[:, None], in x's dtype.
    x: [B, L, C]; shift, scale: [B, C] (views of the adaLN embedding chunks are fine). The custom op
    `flux_kernels::layernorm_modulate` under torch.compile, a direct launch eagerly."""
    if torch.compiler.is_compiling():
        return _layernorm_modulate_op(x, shift, scale, eps)
    return layernorm_modulate_fwd(x, shift, scale, eps)


def layernorm_modulate_fp8(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """layernorm_modulate quantised per token for an fp8 GEMM in the same pass: (q float8_e4m3fn [B, L, C],
    scale fp32 [B, L, 1]) with q * scale ~= the fp32 result (flux_kernels.fp8.quantize_fp8_rowwise's arithmetic,
    without rounding to x's dtype first). The custom op `flux_kernels::layernorm_modulate_fp8` under
    torch.compile, a direct launch eagerly."""
    if torch.compiler.is_compiling():
        return _layernorm_modulate_fp8_op(x, shift, scale, eps)
    return layernorm_modulate_fwd(x, shift, scale, eps, fp8=True)


def _check_gated_inputs(x, y, gate, shift, scale) -> None:
    op = "gated_residual_layernorm_modulate"
    _check_layernorm_inputs(op, x, gate=gate, shift=shift, scale=scale)
    check_activation(op, "y", y, 3, "[B, L, C]")
    if y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError(f"{op}: y is {tuple(y.shape)} {y.dtype} but x is {tuple(x.shape)} {x.dtype}; they must match")
    check_floating(op, "y", y, x.device)


def gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps: float = 1e-6, fp8: bool = False):
    """Checks, allocates and launches; see gated_residual_layernorm_modulate (fp8: its _fp8 variant)."""
    y_ok = y.shape == x.shape and y.dtype == x.dtype and y.stride()[2] == 1 and y.device == x.device
    if not (y_ok and _layernorm_fast_check(x, gate, shift, scale)):
        _check_gated_inputs(x, y, gate, shift, scale)
    if not x.is_cuda:
        check_runnable(x.device, "gated_residual_layernorm_modulate")
    batch, tokens, channels = x.shape
    residual = new_output(batch, tokens, channels, dtype=x.dtype, device=x.device)
    out, out_scale = _normed_outputs(x, fp8)
    x_strides, y_strides = x.stride(), y.stride()
    key = (batch, tokens, channels, x.dtype, gate.dtype, shift.dtype, scale.dtype, fp8)
    with device_guard(x):
        _launch_gated_residual_layernorm_modulate(
            key, _row_grid(batch, tokens, x.device),
            x, y, gate, shift, scale, residual, out, out_scale,
            x_strides[0], x_strides[1], y_strides[0], y_strides[1],
            gate.stride()[0], shift.stride()[0], scale.stride()[0],
            batch, tokens, channels, eps, BLOCK_C=triton.next_power_of_2(channels), QUANT_FP8=fp8,
        )  # fmt: skip
    return (residual, out, out_scale) if fp8 else (residual, out)


@torch.library.custom_op("flux_kernels::gated_residual_layernorm_modulate", mutates_args=())
def _gated_residual_layernorm_modulate_op(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    return gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps)


@_gated_residual_layernorm_modulate_op.register_fake
def _gated_residual_layernorm_modulate_fake(x, y, gate, shift, scale, eps=1e-6):
    _check_gated_inputs(x, y, gate, shift, scale)
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op("flux_kernels::gated_residual_layernorm_modulate_fp8", mutates_args=())
def _gated_residual_layernorm_modulate_fp8_op(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps, fp8=True)


@_gated_residual_layernorm_modulate_fp8_op.register_fake
def _gated_residual_layernorm_modulate_fp8_fake(x, y, gate, shift, scale, eps=1e-6):
    _check_gated_inputs(x, y, gate, shift, scale)
    scales = x.new_empty((*x.shape[:2], 1), dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=FP8_DTYPE), scales


def gated_residual_layernorm_modulate(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual = x + gate[:, None] * y; normed = layernorm_modulate(residual, shift, scale). One pass.
    x, y: [B, L, C] (same dtype); gate, shift, scale: [B, C] -> (residual, normed), both [B, L, C] in x's dtype.
    The custom op `flux_kernels::gated_residual_layernorm_modulate` under torch.compile, a direct launch eagerly."""
    if torch.compiler.is_compiling():
        return _gated_residual_layernorm_modulate_op(x, y, gate, shift, scale, eps)
    return gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps)


def gated_residual_layernorm_modulate_fp8(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gated_residual_layernorm_modulate with the normalised output quantised per token for an fp8 GEMM:
    (residual [B, L, C] in x's dtype, q float8_e4m3fn [B, L, C], scale fp32 [B, L, 1]); see
    layernorm_modulate_fp8. The custom op `flux_kernels::gated_residual_layernorm_modulate_fp8` under
    torch.compile, a direct launch eagerly."""
    if torch.compiler.is_compiling():
        return _gated_residual_layernorm_modulate_fp8_op(x, y, gate, shift, scale, eps)
    return gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps, fp8=True)


__all__ = [
    "gated_residual_layernorm_modulate",
    "gated_residual_layernorm_modulate_fp8",
    "gated_residual_layernorm_modulate_fp8_ref",
    "gated_residual_layernorm_modulate_fwd",
    "gated_residual_layernorm_modulate_ref",
    "layernorm_modulate",
    "layernorm_modulate_fp8",
    "layernorm_modulate_fp8_ref",
    "layernorm_modulate_fwd",
    "layernorm_modulate_ref",
]
