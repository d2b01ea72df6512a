"""An fp8 projection and its adapters' updates as one GEMM: flux_kernels.fp8_lora_gemm, whose epilogue adds the B
products before the only store, in place of the base GEMM (cuBLAS) followed by one in-place addmm_ a part
(engine/lora_update.py). Measured on an H200 at a FLUX.1-dev step's ten projection shapes with a rank-64 adapter on
every part (benchmarks/kernels/bench_fp8_lora_gemm.py, results/fp8-lora-gemm-h200-20261202-0208.json): 53.7 against
58.0 ms a 1024^2 step, 188.8 against 207.1 at 2048^2.

Taken where it can hold every acting adapter of the projection, else the engine's other path: a bf16 output (an
fp32 pipeline keeps its fp32 outputs), an fp8 base on the tensor cores (or the CPU emulation under the Triton
interpreter, which the tests run), e4m3 input with per-token scales, plain adapters (no bias on B: `plain_adapters`
checks A), each part's adapters' ranks summing to at most MAX_RANK, parts whose widths the kernel's tiles divide
(multiples of 32; FLUX's are multiples of 3072), no autograd; FLUX_ENGINE_LORA_GEMM=0 turns it off. The
arithmetic: A(x) of every acting adapter of the projection as one fp8 GEMM (A quantised per row, as the other path
does), its output columns already `low`'s (each part's adapters side by side, zero rows of A padding them to R) and
each adapter's scaling folded into its columns' scales, so that `low` comes out of cuBLAS rounded once (the other
path rounds A(x) to bf16, then scales and rounds again, and pads in a kernel of its own); B's product accumulated in
fp32 with the base's; the output rounded once (the other path rounds the base to bf16, then the sum).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from flux_kernels import triton_interpreting, triton_runnable
from flux_kernels.fp8_lora_gemm import fp8_lora_gemm_fwd, fp8_lora_gemm_ref, lora_columns, part_alignment

from .quant.fp8 import Fp8Linear, fp8_linear_quantized, quantize_fp8_rowwise

ENABLED = os.environ.get("FLUX_ENGINE_LORA_GEMM", "1") != "0"  # FLUX_ENGINE_LORA_GEMM=0: always the other path
# the kernel on CPU tensors: the Triton interpreter, as set before the kernels were imported (read once: a traced
# forward cannot read Triton's settings)
CPU_INTERPRETED = triton_interpreting() and triton_runnable("cpu")
MAX_RANK = 64  # the rank the kernel's tiles were measured with; a larger sum of ranks on a part takes the other path
MIN_RANK = 16  # the kernel's bf16 MMA needs R >= 16


@torch.library.custom_op("flux_engine::fp8_lora_gemm", mutates_args=())
def fp8_lora_gemm_op(
    x_fp8: torch.Tensor, x_scale: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
    bias: torch.Tensor | None, low: torch.Tensor, low_col: torch.Tensor, up: torch.Tensor, part_align: int,
    fast_accum: bool,
) -> torch.Tensor:  # fmt: skip
    """x_fp8 [M, K] e4m3 with scales [M] @ weight [N, K] e4m3 with scales [N] + bias + each part's low @ up^T ->
    [M, N] bf16: the persistent kernel with the update's operands prefetched, one fixed tile (no tuning pass)."""
    if x_fp8.data_ptr() % 16 or weight_fp8.data_ptr() % 16:  # TMA needs 16-byte aligned bases (a view at an odd
        # offset; not FLUX's own tensors): the same sum in fp32, slower, never wrong
        return fp8_lora_gemm_ref(x_fp8, x_scale, weight_fp8, weight_scale, bias, low, low_col, up)
    return fp8_lora_gemm_fwd(x_fp8, x_scale, weight_fp8, weight_scale, bias, low, low_col, up, part_align,
                             fast_accum, persistent=True, prefetch_lora=True, autotune=False)  # fmt: skip


@fp8_lora_gemm_op.register_fake
def _(x_fp8, x_scale, weight_fp8, weight_scale, bias, low, low_col, up, part_align, fast_accum):
    return x_fp8.new_empty(x_fp8.shape[0], weight_fp8.shape[0], dtype=torch.bfloat16)


def _scaled_down_products(
    base: nn.Module, x2: torch.Tensor, scale2: torch.Tensor, updates_by_part: list[list[tuple[nn.Module, str]]],
    ranks: list[int], rank: int,
) -> torch.Tensor:  # fmt: skip
    """`low` [M, updated parts x R] in bf16: each acting adapter's A(x) * scaling, as one fp8 GEMM on x's e4m3 codes
    (the Fp8Linear `base`'s arithmetic: A quantised per row) whose rows are the parts' adapters in order, zero rows
    padding each part to R, and whose per-column scales carry the adapters' scalings (padding columns: 0)."""
    downs, column_scales = [], []
    for part, part_rank in zip(updates_by_part, ranks, strict=True):
        for layer, name in part:
            downs.append(layer.lora_A[name].weight)
            column_scales.append(_column_scales(layer.scaling[name], rank_of(layer, name), scale2))
        if part and rank > part_rank:
            downs.append(downs[-1].new_zeros(rank - part_rank, x2.shape[1]))
            column_scales.append(scale2.new_zeros(rank - part_rank, dtype=torch.float32))
    a_fp8, a_scale = quantize_fp8_rowwise(torch.cat(downs))
    weight_scale = a_scale.reshape(-1) * torch.cat(column_scales)
    return fp8_linear_quantized(x2, scale2.float().view(-1, 1), a_fp8, weight_scale, None, base.compute,
                                torch.bfloat16, bool(base.fast_accum))  # fmt: skip


def _column_scales(scaling, rank: int, like: torch.Tensor) -> torch.Tensor:
    """An adapter's scaling for each of its `rank` columns of `low`, in fp32 (PEFT multiplies by a float scale in
    fp32; a tensor one, engine.lora.scalings_as_tensors' 0-dim float64, the same way: engine.lora_update.scaled)."""
    if isinstance(scaling, torch.Tensor):
        return scaling.to(device=like.device, dtype=torch.float32).expand(rank)
    return like.new_full((rank,), scaling, dtype=torch.float32)


def rank_of(layer: nn.Module, name: str) -> int:
    """An adapter's rank as its factors have it (a hot-swap target rank pads them beyond PEFT's `r`)."""
    return layer.lora_A[name].weight.shape[0]


def padded_rank(ranks: list[int]) -> int:
    """The kernel's R for parts whose adapters' ranks sum to these: a power of two >= MIN_RANK; 0 if one exceeds
    MAX_RANK (the other path)."""
    largest = max(ranks, default=0)
    if largest > MAX_RANK:
        return 0
    rank = MIN_RANK
    while rank < largest:
        rank *= 2
    return rank


def fused_update_ready(base: nn.Module, x_fp8: torch.Tensor, widths: list[int],
                       updates_by_part: list[list[tuple[nn.Module, str]]], out_dtype: torch.dtype) -> bool:  # fmt: skip
    """Whether the kernel can compute the fp8 `base` (an Fp8Linear) on x_fp8 with these updates into out_dtype
    (module docstring; the kernel writes bf16: an fp32 pipeline keeps the other path's fp32 outputs)."""
    if not ENABLED or out_dtype != torch.bfloat16 or not isinstance(base, Fp8Linear) or torch.is_grad_enabled():
        return False
    # sm_90 / sm_100 (flux_kernels.fp8_lora_gemm.runs_here), in a form dynamo folds to a constant; the CPU: under
    # the interpreter
    if not (torch.cuda.get_device_properties(x_fp8.device).major in (9, 10) if x_fp8.is_cuda else CPU_INTERPRETED):
        return False
    if base._forward_pre_hooks or base._forward_hooks:  # the layer's own hooks (offload 'leaf' moves its weights in
        return False  # one) run only through its forward: the two-GEMM path calls it
    if base.in_features % 16 or not (x_fp8.is_contiguous() and base.weight_fp8.is_contiguous()):
        return False
    if base.compute != ("scaled_mm" if x_fp8.is_cuda else "emulate"):
        return False
    if part_alignment(widths) % 32 or not any(updates_by_part):
        return False
    ranks = [sum(rank_of(layer, name) for layer, name in part) for part in updates_by_part]
    no_b_bias = all(layer.lora_B[name].bias is None for part in updates_by_part for layer, name in part)
    return no_b_bias and padded_rank(ranks) > 0


def fp8_gemm_with_updates(
    base: nn.Module, x_fp8: torch.Tensor, x_scale: torch.Tensor, widths: list[int],
    updates_by_part: list[list[tuple[nn.Module, str]]],
) -> torch.Tensor:  # fmt: skip
    """base(x_fp8, x_scale) with each part's (PEFT layer, adapter) updates added to its columns, as one GEMM
    (`fused_update_ready` must hold). x_fp8 [..., K] e4m3, x_scale [..., 1]; widths: the parts' column counts, in
    order; returns [..., N] in bf16."""
    leading = x_fp8.shape[:-1]
    x2, scale2 = x_fp8.reshape(-1, x_fp8.shape[-1]), x_scale.reshape(-1)
    ranks = [sum(rank_of(layer, name) for layer, name in part) for part in updates_by_part]
    rank = padded_rank(ranks)
    low = _scaled_down_products(base, x2, scale2, updates_by_part, ranks, rank)
    up_parts = []
    for width, part, part_rank in zip(widths, updates_by_part, ranks, strict=True):
        # this part's adapters' B side by side along the rank, zero-padded to R (a part without: all zeros, never
        # read: its columns' low_col is -1); one adapter of rank R as it is (no copy)
        ups = [layer.lora_B[name].weight.to(torch.bfloat16) for layer, name in part]
        if len(ups) == 1 and part_rank == rank and ups[0].is_contiguous():
            up_parts.append(ups[0])
        else:
            up_parts.append(torch.cat([*ups, x2.new_zeros(width, rank - part_rank, dtype=torch.bfloat16)], dim=1))
    up = up_parts[0] if len(up_parts) == 1 else torch.cat(up_parts)
    low_col = lora_columns(widths, ranks, rank, x_fp8.device)
    bias = None if base.bias is None else base.bias.to(torch.bfloat16)
    out = fp8_lora_gemm_op(x2, scale2.float(), base.weight_fp8, base.weight_scale.reshape(-1).float(), bias, low,
                           low_col, up, part_alignment(widths), bool(base.fast_accum))  # fmt: skip
    return out.view(*leading, sum(widths))


__all__ = ["ENABLED", "MAX_RANK", "fp8_gemm_with_updates", "fp8_lora_gemm_op", "fused_update_ready", "padded_rank"]
