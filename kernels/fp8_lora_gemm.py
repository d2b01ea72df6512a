"""An fp8 projection with its LoRA updates in the epilogue: out = (x_e4m3 @ W_e4m3^T) * x_scale[m] * w_scale[n] + bias
+ low[:, part's columns] @ up^T, one GEMM, one store.

Why (issue "LoRA", benchmarks/NOTES.md 2026-11-29 evening and 2026-11-30 09:50): beside cuBLAS's fp8 GEMM an unmerged
adapter's B product is a second GEMM that reads and writes the projection's whole output again (lora_addmm_), ~27 GB a
1024^2 step of the fastest preset with a rank-64 adapter on every projection. Here the rank-R product is one more
MMA on the accumulator before the store: the output is written once. The A product (`low`, bf16 [M, parts x R],
scaled by each adapter's scaling) stays a separate skinny GEMM, computed before.

Layout: x [M, K] and W [N, K] e4m3, both K-major (the tensor cores' fp8 layout); per-token x_scale [M] and per-channel
w_scale [N] in fp32 (engine.quant.fp8's arithmetic); bias [N] or None; the output bf16 [M, N]. The LoRA parts are
column ranges of the output (a fused QKV: three): `low_col[n]` is the first column in `low` of column n's part (-1: no
update there), `up` [N, R] each column's row of its part's B (adapters of a part concatenated along R, zero-padded to
R). A tile never straddles two parts: the configs kept are those whose BLOCK_N divides every part boundary.
The update's operands load in 16-byte vectors (the kernel knows a part's first column in `low` is a multiple of R;
before 2026-12-02 it did not, and loaded `low` one bf16 at a time); `prefetch_lora` loads them before the K loop
instead of after it, in flight while the tile's fp8 MMAs run.
Accumulation: the fp8 MMAs as cuBLAS's fast accumulation (FAST_ACCUM, Triton's default on sm_90) or promoted to fp32
every 128 products; the update's bf16 MMA in fp32; one rounding to bf16 at the store (cuBLAS then addmm_ round twice).
Measured on an H200: benchmarks/kernels/bench_fp8_lora_gemm.py (results/fp8-lora-gemm-*.json).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

import flux_kernels
from flux_kernels import device_guard, triton_interpreting, triton_runnable

E4M3 = torch.float8_e4m3fn
PROMOTE_EVERY = 128  # products accumulated in the tensor cores' own precision before fp32, without FAST_ACCUM


def _set_descriptor_blocks(nargs) -> None:
    nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _config(block_m, block_n, block_k, stages, warps, group_m=8, **extra) -> triton.Config:
    blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m, **extra}
    return triton.Config(blocks, num_stages=stages, num_warps=warps, pre_hook=_set_descriptor_blocks)


_TILES = [(128, 256, 128, 3, 8), (128, 256, 128, 4, 8), (128, 128, 128, 4, 8), (128, 128, 128, 5, 4),
          (256, 128, 128, 3, 8), (64, 256, 128, 4, 4)]  # fmt: skip
_PERSISTENT = _TILES[:3] + [(256, 128, 128, 3, 8)]
GPU_CONFIGS = [_config(*tile) for tile in _TILES]
# parts narrower than 128 columns (tests' shapes; no FLUX projection): used only when no config above fits
SMALL_CONFIGS = [_config(64, 32, 32, 3, 4)]
INTERPRETER_CONFIG = _config(16, 32, 32, 1, 4, group_m=2)
# without autotuning (the engine: a tuning pass per new token count would cost seconds at each new size): the
# persistent kernel's pick for nearly every FLUX shape with a prefetched rank-64 update on the H200
# (results/fp8-lora-gemm-h200-20261202-0208.json), then narrower tiles where the parts need them
FIXED_CONFIGS = [_config(128, 256, 128, 3, 8, FLATTEN=False), _config(128, 128, 128, 4, 8, FLATTEN=False),
                 _config(64, 32, 32, 3, 4, FLATTEN=False)]  # fmt: skip


def _prune(configs, named_args, **kwargs):
    """Keep the configs whose BLOCK_N divides every part boundary (PART_ALIGN): the FLUX tiles where one fits, else
    the small ones. K needs no fit: the descriptors' loads past K read zeros."""
    align = named_args["PART_ALIGN"]
    kept = [c for c in configs if align % c.kwargs["BLOCK_N"] == 0]
    if not kept:
        raise ValueError(
            f"fp8_lora_gemm: no tile fits part boundaries aligned to {align} columns; the narrowest tile is "
            f"{min(c.kwargs['BLOCK_N'] for c in configs)} (use parts whose widths are multiples of 32)"
        )
    large = [c for c in kept if c.kwargs["BLOCK_N"] >= 128]
    return large or kept


@triton.jit
def _tile(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped tile order: GROUP_M row tiles walk the column tiles together, so W's tiles are reused from L2
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return (first_m + (tile % per_group) % group_rows) * BLOCK_M, ((tile % per_group) // group_rows) * BLOCK_N


@triton.jit
def _lora_operands(off_m, off_n, LOW, LOW_COL, UP, M, N, stride_low, stride_up, RANK: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """The tile's update operands: its rows of its part's columns of LOW [BLOCK_M, RANK] and its columns' rows of UP
    [BLOCK_N, RANK], and `first`, the part's first column in LOW (-1: no update there; the loads then read nothing)."""
    rows = off_m + tl.arange(0, BLOCK_M)
    cols = off_n + tl.arange(0, BLOCK_N)
    # a multiple of RANK (lora_columns) or -1: written as one, the compiler loads LOW's rows in 16-byte vectors, not one
    # by one; (c + R) // R - 1 keeps -1 negative (-R) where Triton's // (rounding toward zero) takes -1 // R to 0
    first = ((tl.load(LOW_COL + off_n) + RANK) // RANK - 1) * RANK
    rank = tl.arange(0, RANK)
    low = tl.load(LOW + rows[:, None].to(tl.int64) * stride_low + first + rank[None, :],
                  mask=(rows < M)[:, None] & (first >= 0), other=0.0)  # fmt: skip
    up = tl.load(UP + cols[:, None].to(tl.int64) * stride_up + rank[None, :], mask=(cols < N)[:, None] & (first >= 0),
                 other=0.0)  # fmt: skip
    return low, up, first


@triton.jit
def _epilogue(acc, off_m, off_n, X_SCALE, W_SCALE, BIAS, low, up, first, OUT, M, N, stride_out,
              HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):  # fmt: skip
    """Both scales, the bias, the tile's LoRA update (one bf16 MMA on the operands `_lora_operands` loaded), one
    rounding, the store."""
    rows = off_m + tl.arange(0, BLOCK_M)
    cols = off_n + tl.arange(0, BLOCK_N)
    row_in, col_in = rows < M, cols < N
    x_scale = tl.load(X_SCALE + rows, mask=row_in, other=0.0)
    w_scale = tl.load(W_SCALE + cols, mask=col_in, other=0.0)
    acc = acc * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA:  # noqa: SIM102 (a compile-time branch around a run-time one: without an update, `first` is no tensor)
        if first >= 0:
            acc = tl.dot(low, up.T, acc)
    out = OUT + rows[:, None].to(tl.int64) * stride_out + cols[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=row_in[:, None] & col_in[None, :])


@triton.jit
def _fp8_lora_gemm_fwd_kernel(x_desc, w_desc, X_SCALE, W_SCALE, BIAS, LOW, LOW_COL, UP, OUT, M, N, K, PART_ALIGN,
                              stride_low, stride_up, stride_out, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                              RANK: tl.constexpr, FAST_ACCUM: tl.constexpr, PROMOTE: tl.constexpr,
                              PREFETCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    """One program a tile. PREFETCH: the update's operands are loaded before the K loop (in flight during it)
    instead of after it."""
    off_m, off_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    low, up, first = 0, 0, -1
    if HAS_LORA and PREFETCH:
        low, up, first = _lora_operands(off_m, off_n, LOW, LOW_COL, UP, M, N, stride_low, stride_up, RANK, BLOCK_M,
                                        BLOCK_N)  # fmt: skip
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BLOCK_K)):
        a = x_desc.load([off_m, k * BLOCK_K])  # [BLOCK_M, BLOCK_K] e4m3
        b = w_desc.load([off_n, k * BLOCK_K])  # [BLOCK_N, BLOCK_K] e4m3
        if FAST_ACCUM:
            acc = tl.dot(a, b.T, acc)
        else:
            acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=PROMOTE if PROMOTE <= BLOCK_K else BLOCK_K)
    if HAS_LORA and not PREFETCH:
        low, up, first = _lora_operands(off_m, off_n, LOW, LOW_COL, UP, M, N, stride_low, stride_up, RANK, BLOCK_M,
                                        BLOCK_N)  # fmt: skip
    _epilogue(acc, off_m, off_n, X_SCALE, W_SCALE, BIAS, low, up, first, OUT, M, N, stride_out, HAS_BIAS, HAS_LORA,
              BLOCK_M, BLOCK_N)  # fmt: skip


@triton.jit
def _fp8_lora_gemm_persistent_kernel(x_desc, w_desc, X_SCALE, W_SCALE, BIAS, LOW, LOW_COL, UP, OUT, M, N, K,
                                     PART_ALIGN, stride_low, stride_up, stride_out, PROGRAMS,
                                     HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, RANK: tl.constexpr,
                                     FAST_ACCUM: tl.constexpr, PROMOTE: tl.constexpr, PREFETCH: tl.constexpr,
                                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                     GROUP_M: tl.constexpr, FLATTEN: tl.constexpr):  # fmt: skip
    """One program an SM, walking tiles; FLATTEN: Triton flattens the tile and K loops into one pipeline, so the next
    tile's first loads are in flight during this tile's epilogue (Triton's persistent-matmul tutorial)."""
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=FLATTEN):
        off_m, off_n = _tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        low, up, first = 0, 0, -1
        if HAS_LORA and PREFETCH:
            low, up, first = _lora_operands(off_m, off_n, LOW, LOW_COL, UP, M, N, stride_low, stride_up, RANK,
                                            BLOCK_M, BLOCK_N)  # fmt: skip
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.range(0, k_tiles):
            a = x_desc.load([off_m, k * BLOCK_K])
            b = w_desc.load([off_n, k * BLOCK_K])
            if FAST_ACCUM:
                acc = tl.dot(a, b.T, acc)
            else:
                acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=PROMOTE if PROMOTE <= BLOCK_K else BLOCK_K)
        if HAS_LORA and not PREFETCH:
            low, up, first = _lora_operands(off_m, off_n, LOW, LOW_COL, UP, M, N, stride_low, stride_up, RANK,
                                            BLOCK_M, BLOCK_N)  # fmt: skip
        _epilogue(acc, off_m, off_n, X_SCALE, W_SCALE, BIAS, low, up, first, OUT, M, N, stride_out, HAS_BIAS,
                  HAS_LORA, BLOCK_M, BLOCK_N)  # fmt: skip


_KEY = ["M", "N", "K", "PART_ALIGN", "HAS_BIAS", "HAS_LORA", "RANK", "PREFETCH"]
_tuned = triton.autotune(GPU_CONFIGS + SMALL_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(
    _fp8_lora_gemm_fwd_kernel
)
_tuned_persistent = triton.autotune(
    [_config(*tile, FLATTEN=flatten) for tile in _PERSISTENT for flatten in (True, False)]
    + [_config(64, 32, 32, 3, 4, FLATTEN=False)],
    key=_KEY,
    prune_configs_by={"early_config_prune": _prune},
)(_fp8_lora_gemm_persistent_kernel)


def tuned_configs() -> dict[str, dict[str, str]]:
    """What the autotuners picked in this process, per key (M, N, K, part alignment, bias, LoRA, rank, prefetch, then
    the arguments' dtypes): for benchmarks' records."""
    kernels = {"tile_a_program": _tuned, "persistent": _tuned_persistent}
    return {kind: {str(key): str(config) for key, config in kernel.cache.items()} for kind, kernel in kernels.items()}


def runs_here(x_fp8: torch.Tensor) -> bool:
    """Whether the kernel can take x: on an sm_90 / sm_100 GPU (fp8 tensor cores with TMA), or the CPU under the
    interpreter."""
    if x_fp8.is_cuda:
        # Hopper and datacenter Blackwell (228 KB of shared memory a block: the FLUX tiles need ~150; consumer
        # Blackwell, sm_120, has ~100)
        return torch.cuda.get_device_capability(x_fp8.device)[0] in (9, 10)
    return x_fp8.device.type == "cpu" and triton_interpreting() and triton_runnable(x_fp8.device)


def _check(x_fp8, x_scale, weight_fp8, weight_scale, bias, low, low_col, up) -> None:
    op = "fp8_lora_gemm"
    if x_fp8.dtype != E4M3 or weight_fp8.dtype != E4M3:
        raise ValueError(f"{op}: x and weight must be float8_e4m3fn, got {x_fp8.dtype} and {weight_fp8.dtype}")
    if x_fp8.dim() != 2 or weight_fp8.dim() != 2 or x_fp8.shape[1] != weight_fp8.shape[1]:
        raise ValueError(f"{op}: x {tuple(x_fp8.shape)} and weight {tuple(weight_fp8.shape)} must be [M, K] and [N, K]")
    if not (x_fp8.is_contiguous() and weight_fp8.is_contiguous()) or x_fp8.shape[1] % 16:
        raise ValueError(f"{op}: x and weight must be contiguous with K a multiple of 16, got K={x_fp8.shape[1]}")
    m, n = x_fp8.shape[0], weight_fp8.shape[0]
    if x_scale.numel() != m or weight_scale.numel() != n:
        raise ValueError(f"{op}: x_scale has {x_scale.numel()} values for {m} rows, weight_scale {weight_scale.numel()}"
                         f" for {n} columns; one per row / column")  # fmt: skip
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"{op}: bias of shape {tuple(bias.shape)}, expected ({n},)")
    if low is None:
        return
    if low.dim() != 2 or low.shape[0] != m or low.dtype != torch.bfloat16 or low.stride(1) != 1:
        raise ValueError(f"{op}: low must be bf16 [M={m}, columns] with unit column stride, got {low.dtype} "
                         f"{tuple(low.shape)}")  # fmt: skip
    rank = up.shape[1]
    if up.shape[0] != n or up.dtype != torch.bfloat16 or up.stride(1) != 1 or rank < 16 or rank & (rank - 1):
        raise ValueError(f"{op}: up must be bf16 [N={n}, R] with R a power of two >= 16 (zero-pad the adapters' rows),"
                         f" got {up.dtype} {tuple(up.shape)}")  # fmt: skip
    if low_col.shape != (n,) or low_col.dtype != torch.int32:
        raise ValueError(f"{op}: low_col must be int32 [{n}], got {low_col.dtype} {tuple(low_col.shape)}")


def fp8_lora_gemm_fwd(x_fp8, x_scale, weight_fp8, weight_scale, bias=None, low=None, low_col=None, up=None,
                      part_align: int | None = None, fast_accum: bool = True,
                      persistent: bool = False, prefetch_lora: bool = False,
                      autotune: bool = True) -> torch.Tensor:  # fmt: skip
    """The kernel (`runs_here(x_fp8)` must hold). part_align: a number every part boundary is a multiple of (the
    kernel's column tiles never straddle a part); default N. persistent: one program an SM walking the tiles.
    prefetch_lora: each tile loads its update's operands before its K loop rather than after it. autotune: False
    runs the persistent kernel with the first of FIXED_CONFIGS that fits the parts (no tuning pass at a new shape)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    _check(x_fp8, x_scale, weight_fp8, weight_scale, bias, low, low_col, up)
    (m, k), n = x_fp8.shape, weight_fp8.shape[0]
    out = torch.empty(m, n, device=x_fp8.device, dtype=torch.bfloat16)
    if flux_kernels.POISON_OUTPUTS:
        out.fill_(float("nan"))
    has_lora = low is not None
    dummy = weight_scale  # a pointer never read
    placeholder = [16, 16]  # the autotuner's pre-hook (or the launch below) sets each config's blocks
    x_desc, w_desc = (
        TensorDescriptor.from_tensor(x_fp8, placeholder),
        TensorDescriptor.from_tensor(weight_fp8, placeholder),
    )
    args = (x_desc, w_desc, x_scale.reshape(-1).float(), weight_scale.reshape(-1).float(),
            bias if bias is not None else dummy, low if has_lora else dummy, low_col if has_lora else dummy,
            up if has_lora else dummy, out, m, n, k, part_align or n,
            low.stride(0) if has_lora else 0, up.stride(0) if has_lora else 0, out.stride(0))  # fmt: skip
    constexprs = dict(HAS_BIAS=bias is not None, HAS_LORA=has_lora, RANK=up.shape[1] if has_lora else 16,
                      FAST_ACCUM=fast_accum, PROMOTE=PROMOTE_EVERY, PREFETCH=prefetch_lora)  # fmt: skip
    programs = _programs(x_fp8.device) if persistent else 0

    def grid(meta):
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        return (min(tiles, programs) if persistent else tiles,)

    with device_guard(x_fp8):
        if triton_interpreting():
            config = INTERPRETER_CONFIG.kwargs
            x_desc.block_shape = [config["BLOCK_M"], config["BLOCK_K"]]
            w_desc.block_shape = [config["BLOCK_N"], config["BLOCK_K"]]
            if persistent:
                _fp8_lora_gemm_persistent_kernel[grid(config)](*args, programs, **constexprs, **config, FLATTEN=False)
            else:
                _fp8_lora_gemm_fwd_kernel[grid(config)](*args, **constexprs, **config)
        elif not autotune:
            config = _fixed_config(part_align or n)
            _set_descriptor_blocks({"x_desc": x_desc, "w_desc": w_desc, **config.kwargs})
            programs = _programs(x_fp8.device)
            persistent = True
            _fp8_lora_gemm_persistent_kernel[grid(config.kwargs)](*args, programs, **constexprs, **config.kwargs,
                                                                  num_warps=config.num_warps,
                                                                  num_stages=config.num_stages)  # fmt: skip
        elif persistent:
            _tuned_persistent[grid](*args, programs, **constexprs)
        else:
            _tuned[grid](*args, **constexprs)
    return out


def _fixed_config(part_align: int) -> triton.Config:
    for config in FIXED_CONFIGS:
        if part_align % config.kwargs["BLOCK_N"] == 0:
            return config
    raise ValueError(f"fp8_lora_gemm: no tile fits part boundaries aligned to {part_align} columns; the narrowest "
                     f"tile is 32 (use parts whose widths are multiples of 32)")  # fmt: skip


def _programs(device: torch.device) -> int:
    """The persistent kernel's programs: one an SM (3 under the interpreter, so that each walks several tiles)."""
    if device.type != "cuda":
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


def lora_columns(part_widths: list[int], part_ranks: list[int], rank: int, device) -> torch.Tensor:
    """low_col for parts of these widths (in column order) whose updates have these ranks (0: none) in `low`, each
    part's columns padded to `rank`: part p's first column in low is rank x (its index among the updated parts)."""
    columns, next_first = [], 0
    for width, part_rank in zip(part_widths, part_ranks, strict=True):
        if part_rank > rank:
            raise ValueError(f"fp8_lora_gemm: a part's adapters have rank {part_rank} in all, above the padded {rank}")
        columns.append(torch.full((width,), next_first if part_rank else -1, dtype=torch.int32, device=device))
        next_first += rank if part_rank else 0
    return torch.cat(columns)


def part_alignment(part_widths: list[int]) -> int:
    """The largest number every part boundary is a multiple of."""
    align, edge = 0, 0
    for width in part_widths:
        edge += width
        align = math.gcd(align, edge)
    return align


def fp8_lora_gemm_ref(x_fp8, x_scale, weight_fp8, weight_scale, bias=None, low=None, low_col=None, up=None):
    """In fp32: the fp8 products' sum with both scales and the bias, plus each column's update from its part's columns
    of low; rounded once to bf16."""
    out = (
        (x_fp8.float() @ weight_fp8.float().t()) * x_scale.reshape(-1, 1).float() * weight_scale.reshape(1, -1).float()
    )
    if bias is not None:
        out = out + bias.float()
    if low is not None:
        rank = up.shape[1]
        for first in low_col.unique().tolist():
            if first >= 0:
                columns = low_col == first
                out[:, columns] += low[:, first : first + rank].float() @ up[columns].float().t()
    return out.to(torch.bfloat16)


def fp8_lora_gemm(x_fp8, x_scale, weight_fp8, weight_scale, bias=None, low=None, low_col=None, up=None,
                  part_align: int | None = None, fast_accum: bool = True, persistent: bool = False,
                  prefetch_lora: bool = False, autotune: bool = True) -> torch.Tensor:  # fmt: skip
    """The kernel where `runs_here(x_fp8)`, else `fp8_lora_gemm_ref`."""
    if not runs_here(x_fp8):
        return fp8_lora_gemm_ref(x_fp8, x_scale, weight_fp8, weight_scale, bias, low, low_col, up)
    return fp8_lora_gemm_fwd(
        x_fp8, x_scale, weight_fp8, weight_scale, bias, low, low_col, up, part_align, fast_accum, persistent,
        prefetch_lora, autotune,
    )


__all__ = ["fp8_lora_gemm", "fp8_lora_gemm_fwd", "fp8_lora_gemm_ref", "lora_columns", "part_alignment", "runs_here",
           "tuned_configs"]
