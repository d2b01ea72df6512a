"""The A products of a projection's LoRA adapters on its e4m3 input, as one kernel: low[m, c] = (x_e4m3[m] . a[c]) *
x_scale[m] * col_scale[c], rounded once to bf16.

Why (issue "LoRA", benchmarks/NOTES.md 2026-12-02 10:50): beside engine.lora_gemm's one GEMM, each adapted fp8
projection ran its A products as A quantised to e4m3 (a reduction kernel a call), cuBLAS's fp8 GEMM with only
64..256 output columns (one or two column tiles: half of the H200's SMs idle, ~28 us at a 1024^2 step's 4096 x 3072
x 192), then a kernel scaling, rounding and padding the result into `low`. Here A stays bf16 (no quantisation a
call, and no e4m3 rounding of A), x's e4m3 codes are exact in bf16, the column tiles are 64 wide and the row tiles
shrink until the grid covers the SMs, and the scaling and the layout the LoRA GEMM reads (`low`: each part's adapters
side by side, zero-padded to the rank) are the store.

Layout: x [M, K] e4m3 row-major with per-row fp32 scales [M]; a [C, K] bf16 (the adapters' lora_A rows in `low`'s
column order, zero rows for the padding); col_scale [C] fp32 (each column's adapter scaling; any finite value for
padding); the output [M, C] bf16. Accumulation in fp32 on the bf16 tensor cores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import flux_kernels
from flux_kernels import device_guard, triton_interpreting, triton_runnable

E4M3 = torch.float8_e4m3fn
BLOCK_C = 64  # a rank-64 adapter: one column tile
BLOCK_K = 128


@triton.jit
def _lora_down_kernel(X, X_SCALE, A, COL_SCALE, OUT, M, C, K, stride_x, stride_a, stride_out,
                      BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < C
    x_ptrs = X + rows.to(tl.int64)[:, None] * stride_x + ks[None, :]
    a_ptrs = A + cols.to(tl.int64)[None, :] * stride_a + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x.to(tl.bfloat16), a, acc)  # e4m3 -> bf16 is exact
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    x_scale = tl.load(X_SCALE + rows, mask=row_ok, other=0.0)
    col_scale = tl.load(COL_SCALE + cols, mask=col_ok, other=0.0)
    out = acc * x_scale[:, None] * col_scale[None, :]
    out_ptrs = OUT + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, out.to(tl.bfloat16), mask=row_ok[:, None] & col_ok[None, :])


def runs_here(x_fp8: torch.Tensor) -> bool:
    """On a GPU with bf16 tensor cores (sm_80+; the engine takes it where its LoRA GEMM runs), or the CPU under the
    interpreter."""
    if x_fp8.is_cuda:
        return torch.cuda.get_device_capability(x_fp8.device)[0] >= 8
    return x_fp8.device.type == "cpu" and triton_interpreting() and triton_runnable(x_fp8.device)


def launch_shape(m: int, c: int, programs: int) -> tuple[int, int, int]:
    """(BLOCK_M, warps, stages) for M rows and C columns: 64-row tiles (the bf16 wgmma's) where they give every SM a
    program, else 32-row ones (rank-64 parts of 4096-4608 tokens: 64 or 72 programs of 64 rows, 128 or 144 of 32)."""
    tiles_c = triton.cdiv(c, BLOCK_C)
    if triton.cdiv(m, 64) * tiles_c >= programs:
        return 64, 4, 4
    return 32, 4, 4


def _check(x_fp8, x_scale, a, col_scale) -> None:
    op = "lora_down"
    if x_fp8.dtype != E4M3 or x_fp8.dim() != 2 or x_fp8.stride(1) != 1:
        raise ValueError(f"{op}: x must be float8_e4m3fn [M, K] with unit column stride, got {x_fp8.dtype} "
                         f"{tuple(x_fp8.shape)} strides {x_fp8.stride()}")  # fmt: skip
    if a.dtype != torch.bfloat16 or a.dim() != 2 or a.shape[1] != x_fp8.shape[1] or a.stride(1) != 1:
        raise ValueError(f"{op}: a must be bf16 [C, K={x_fp8.shape[1]}] with unit column stride, got {a.dtype} "
                         f"{tuple(a.shape)}")  # fmt: skip
    if x_scale.numel() != x_fp8.shape[0] or col_scale.numel() != a.shape[0]:
        raise ValueError(f"{op}: x_scale has {x_scale.numel()} values for {x_fp8.shape[0]} rows, col_scale "
                         f"{col_scale.numel()} for {a.shape[0]} columns; one per row / column")  # fmt: skip


def lora_down_fwd(x_fp8: torch.Tensor, x_scale: torch.Tensor, a: torch.Tensor, col_scale: torch.Tensor) -> torch.Tensor:
    """The kernel (`runs_here(x_fp8)` must hold): bf16 [M, C]."""
    _check(x_fp8, x_scale, a, col_scale)
    (m, k), c = x_fp8.shape, a.shape[0]
    out = torch.empty(m, c, device=x_fp8.device, dtype=torch.bfloat16)
    if flux_kernels.POISON_OUTPUTS:
        out.fill_(float("nan"))
    if m == 0 or c == 0:
        return out
    x_scale, col_scale = x_scale.reshape(-1).float(), col_scale.reshape(-1).float()
    if triton_interpreting():
        block_m, block_c, block_k, warps, stages = 16, 16, 32, 4, 1
    else:
        programs = torch.cuda.get_device_properties(x_fp8.device).multi_processor_count
        (block_m, warps, stages), block_c, block_k = launch_shape(m, c, programs), BLOCK_C, BLOCK_K
    grid = (triton.cdiv(m, block_m), triton.cdiv(c, block_c))
    with device_guard(x_fp8):
        _lora_down_kernel[grid](x_fp8, x_scale, a, col_scale, out, m, c, k, x_fp8.stride(0), a.stride(0),
                                out.stride(0), BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_K=block_k, num_warps=warps,
                                num_stages=stages)  # fmt: skip
    return out


def lora_down_ref(x_fp8: torch.Tensor, x_scale: torch.Tensor, a: torch.Tensor, col_scale: torch.Tensor) -> torch.Tensor:
    """In fp32, rounded once to bf16."""
    out = (x_fp8.float() @ a.float().t()) * x_scale.reshape(-1, 1).float() * col_scale.reshape(1, -1).float()
    return out.to(torch.bfloat16)


def lora_down(x_fp8: torch.Tensor, x_scale: torch.Tensor, a: torch.Tensor, col_scale: torch.Tensor) -> torch.Tensor:
    """The kernel where `runs_here(x_fp8)`, else `lora_down_ref`."""
    if not runs_here(x_fp8):
        return lora_down_ref(x_fp8, x_scale, a, col_scale)
    return lora_down_fwd(x_fp8, x_scale, a, col_scale)


__all__ = ["launch_shape", "lora_down", "lora_down_fwd", "lora_down_ref", "runs_here"]
