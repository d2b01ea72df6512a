"""GELU (tanh approximation) of an MLP's hidden activations, optionally after a prefix that is copied as it is,
quantised per token to float8 e4m3 for the fp8 projection that reads them, in one pass.

gelu_concat_fp8(prefix, x): q, scale = quantize_fp8_rowwise(cat([prefix, gelu_tanh(x)], -1)), computed in fp32
    from the inputs (no rounding to bf16 in between). The FLUX blocks' two fp8 inputs that no norm kernel makes:
    - double-stream MLP: ff.net.2's input is gelu(ff.net.0.proj(...)): prefix None, x [B, L, 12288];
    - single-stream: proj_out's input is cat([attention output, gelu(mlp)]): prefix [B, L, 3072], x [B, L, 12288].
    Unfused, inductor makes these two or three kernels (an amax reduction over the 15360-wide row, then the
    quantising pass, each recomputing the GELU), which measured ~330 us per single-stream block at 1024^2 on an
    H100, ~11% of an fp8 forward (benchmarks/NOTES.md, 22:04 UTC).
Non-finite inputs as in kernels/fp8.py's e4m3 helpers: a NaN stays NaN (its GEMM output row is NaN), the scale
and the row's other values stay finite.
One program per token (a [K] row in registers, K <= 16384 per input); the grid's second axis is the batch, so
inputs may be views with any batch / token strides (the MLP half of the single-stream block's fused linear1 output
is a slice); the last dim must be contiguous. bf16, fp16 or fp32 inputs. Under torch.compile the custom op
`flux_kernels::gelu_concat_fp8`, eagerly a direct launch.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra import libdevice

from flux_kernels import check_runnable, device_guard, new_output, triton_interpreting
from flux_kernels.fp8 import FP8_DTYPE, e4m3, e4m3_scale, quantize_fp8_rowwise  # e4m3*: shared with layernorm
from flux_kernels.rowwise import ACTIVATION_DTYPES

MAX_WIDTH = 16384
# gelu_tanh(x) = x * 0.5 * (1 + tanh(z)) = x * sigmoid(2 z) = x / (1 + 2^(-2 z log2(e))), z = sqrt(2 / pi) (x + 0.044715
# x^3), so -2 z log2(e) = x (K1 + K2 x^2): one fma, two products, exp2, an add and an approximate division a value
# (the kernel is bound by its instruction issue as much as by memory: benchmarks/NOTES.md, 2026-11-30 07:24 and
# 21:44; SASS for sm_90: 28.75 -> 19.75 instructions a value)
GELU_EXP2_K1 = tl.constexpr(-2.302208198144325)  # -2 sqrt(2 / pi) log2(e)
GELU_EXP2_K2 = tl.constexpr(-0.1029432395800235)  # K1 * 0.044715


def gelu_concat_fp8_ref(prefix: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8_rowwise(cat([prefix, gelu(x, approximate='tanh')], -1)) in fp32: (e4m3 [B, L, Kp + K],
    fp32 scales [B, L, 1])."""
    hidden = F.gelu(x.float(), approximate="tanh")
    if prefix is not None:
        hidden = torch.cat([prefix.float(), hidden], dim=-1)
    return quantize_fp8_rowwise(hidden)


@triton.jit
def _gelu_concat_fp8_kernel(
    PREFIX,
    X,
    OUT,
    OUT_SCALE,
    stride_p_b,
    stride_p_l,
    stride_x_b,
    stride_x_l,
    L,
    KP,
    K,
    HAS_PREFIX: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    APPROX_DIVIDE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    batch = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    x = tl.load(X + batch * stride_x_b + token * stride_x_l + cols, mask=mask, other=0.0).to(tl.float32)
    # tensors first: Triton 3.7's interpreter turns `constexpr * tensor` into a constexpr holding a tensor, which
    # tl.exp2 then cannot take ("cannot convert ... to tensor"); the compiled code is the same either way.
    # Large negative x: 2^(...) = inf, x / inf = -0; NaN stays NaN. gelu(0) = 0: masked columns stay 0.
    denominator = tl.exp2(x * (x * x * GELU_EXP2_K2 + GELU_EXP2_K1)) + 1.0
    # div.approx.ftz (a reciprocal and a product; 2 ulp, 1/inf = 0; fp32 subnormals flush to 0): 3 fewer instructions
    if APPROX_DIVIDE:
        hidden = libdevice.fast_dividef(x, denominator)
    else:  # the interpreter has no libdevice
        hidden = x / denominator
    amax = tl.max(tl.abs(hidden), axis=0)
    if HAS_PREFIX:
        prefix_cols = tl.arange(0, BLOCK_P)
        prefix_mask = prefix_cols < KP
        prefix = tl.load(PREFIX + batch * stride_p_b + token * stride_p_l + prefix_cols, mask=prefix_mask, other=0.0)
        prefix = prefix.to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(prefix), axis=0))
    scale, inverse = e4m3_scale(amax)  # one division per token, products per element (kernels/fp8.py)
    row = (batch * L + token) * (KP + K)
    if HAS_PREFIX:
        tl.store(OUT + row + prefix_cols, e4m3(prefix, inverse, OUT.dtype.element_ty), mask=prefix_mask)
    tl.store(OUT + row + KP + cols, e4m3(hidden, inverse, OUT.dtype.element_ty), mask=mask)
    tl.store(OUT_SCALE + batch * L + token, scale)


def _check_input(name: str, t: torch.Tensor) -> None:
    op = "gelu_concat_fp8"
    if t.dim() != 3:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}; expected 3 dims [B, L, K]")
    if t.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"{op}: {name} has dtype {t.dtype}; allowed: bfloat16, float16, float32")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{op}: {name} has stride {t.stride(-1)} in its last dim; it must be 1 (call .contiguous())")
    if not 1 <= t.shape[-1] <= MAX_WIDTH or min(t.shape) < 1:
        raise ValueError(f"{op}: {name} {tuple(t.shape)}: need B, L >= 1 and 1 <= K <= {MAX_WIDTH}")


def _check_inputs(prefix: torch.Tensor | None, x: torch.Tensor) -> None:
    _check_input("x", x)
    if prefix is not None:
        _check_input("prefix", prefix)
        if prefix.shape[:2] != x.shape[:2] or prefix.device != x.device:
            raise ValueError(
                f"gelu_concat_fp8: prefix {tuple(prefix.shape)} on {prefix.device} and x {tuple(x.shape)} on "
                f"{x.device} must share [B, L] and the device"
            )


@functools.cache
def _num_warps(block_k: int) -> int:
    # ~32 fp32 values of the row per thread; 4 under the interpreter (its cost is per program, not per thread).
    # Cached: the interpreter is chosen once, at import, and this runs on every launch.
    return 4 if triton_interpreting() else max(4, min(16, block_k // 1024))


def gelu_concat_fp8_fwd(prefix: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks, allocates and launches; see gelu_concat_fp8."""
    _check_inputs(prefix, x)
    if not x.is_cuda:
        check_runnable(x.device, "gelu_concat_fp8")
    batch, tokens, width = x.shape
    prefix_width = 0 if prefix is None else prefix.shape[2]
    out = new_output(batch, tokens, prefix_width + width, dtype=FP8_DTYPE, device=x.device)
    scale = new_output(batch, tokens, 1, dtype=torch.float32, device=x.device)
    p = x if prefix is None else prefix  # a placeholder pointer when there is no prefix
    block_k = triton.next_power_of_2(width)
    with device_guard(x):
        _gelu_concat_fp8_kernel[(tokens, batch)](
            p, x, out, scale, p.stride(0), p.stride(1), x.stride(0), x.stride(1), tokens, prefix_width, width,
            HAS_PREFIX=prefix is not None, BLOCK_P=triton.next_power_of_2(max(prefix_width, 1)), BLOCK_K=block_k,
            APPROX_DIVIDE=not triton_interpreting(), num_warps=_num_warps(block_k),
        )  # fmt: skip
    return out, scale


@torch.library.custom_op("flux_kernels::gelu_concat_fp8", mutates_args=())
def _gelu_concat_fp8_op(prefix: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return gelu_concat_fp8_fwd(prefix, x)


@_gelu_concat_fp8_op.register_fake
def _gelu_concat_fp8_fake(prefix, x):
    _check_inputs(prefix, x)
    width = x.shape[2] + (0 if prefix is None else prefix.shape[2])
    return x.new_empty((*x.shape[:2], width), dtype=FP8_DTYPE), x.new_empty((*x.shape[:2], 1), dtype=torch.float32)


def gelu_concat_fp8(prefix: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cat([prefix, gelu(x, approximate='tanh')], -1) quantised per token for an fp8 GEMM: (q float8_e4m3fn
    [B, L, Kp + K], scale fp32 [B, L, 1]) with q * scale ~= the fp32 result. prefix: [B, L, Kp] or None;
    x: [B, L, K], K and Kp <= 16384, last dims contiguous."""
    if torch.compiler.is_compiling():
        return _gelu_concat_fp8_op(prefix, x)
    return gelu_concat_fp8_fwd(prefix, x)


__all__ = ["gelu_concat_fp8", "gelu_concat_fp8_fwd", "gelu_concat_fp8_ref"]
