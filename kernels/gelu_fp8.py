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
One program per token (a [K] row in registers, K <= 16384 per input; FLUX's 12288 and 3072 columns as three
power-of-two chunks each, so no lane is masked); the grid's second axis is the batch, so
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
def _gelu(x, APPROX_DIVIDE: tl.constexpr):
    # tensors first: Triton 3.7's interpreter turns `constexpr * tensor` into a constexpr holding a tensor, which
    # tl.exp2 then cannot take ("cannot convert ... to tensor"); the compiled code is the same either way.
    # Large negative x: 2^(...) = inf, x / inf = -0; NaN stays NaN. gelu(0) = 0: masked columns stay 0.
    denominator = tl.exp2(x * (x * x * GELU_EXP2_K2 + GELU_EXP2_K1)) + 1.0
    # div.approx.ftz (a reciprocal and a product; 2 ulp, 1/inf = 0; fp32 subnormals flush to 0): 3 fewer instructions
    if APPROX_DIVIDE:
        hidden = libdevice.fast_dividef(x, denominator)
    else:  # the interpreter has no libdevice
        hidden = x / denominator
    return hidden


@triton.jit
def _prefix(p_row, ps_row, cols, mask, rounding_dtype, SCALED_PREFIX: tl.constexpr):
    # the prefix's columns `cols` in fp32; SCALED_PREFIX: e4m3 codes times their column's fp32 scale, rounded to x's
    # dtype as the unfused (codes.float() * scale).to(dtype) rounds them (so the e4m3 output is the same bits)
    if SCALED_PREFIX:
        codes = tl.load(p_row + cols, mask=mask, other=0.0).to(tl.float32)
        value = (codes * tl.load(ps_row + cols, mask=mask, other=0.0)).to(rounding_dtype).to(tl.float32)
    else:
        value = tl.load(p_row + cols, mask=mask, other=0.0).to(tl.float32)
    return value


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
    THIRDS: tl.constexpr,
    PREFIX_SCALE,
    stride_ps_b,
    SCALED_PREFIX: tl.constexpr,
):
    # THIRDS: K = 3 BLOCK_K and KP = 3 BLOCK_P (FLUX's 12288 and 3072), each row read as three power-of-two chunks
    # held at once: no masked lanes (one padded BLOCK_K of 16384 for 12288 columns spends a quarter of the issue
    # slots of a kernel bound by them on lanes that do nothing). Otherwise one chunk, masked past K (and KP).
    token = tl.program_id(0).to(tl.int64)
    batch = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    x_row = X + batch * stride_x_b + token * stride_x_l
    h0 = _gelu(tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32), APPROX_DIVIDE)
    largest = tl.abs(h0)
    if THIRDS:
        h1 = _gelu(tl.load(x_row + BLOCK_K + cols).to(tl.float32), APPROX_DIVIDE)
        h2 = _gelu(tl.load(x_row + 2 * BLOCK_K + cols).to(tl.float32), APPROX_DIVIDE)
        largest = tl.maximum(largest, tl.maximum(tl.abs(h1), tl.abs(h2)))  # one reduction for the three
    amax = tl.max(largest, axis=0)
    if HAS_PREFIX:
        prefix_cols = tl.arange(0, BLOCK_P)
        prefix_mask = prefix_cols < KP
        p_row = PREFIX + batch * stride_p_b + token * stride_p_l
        ps_row = PREFIX_SCALE + batch * stride_ps_b
        p0 = _prefix(p_row, ps_row, prefix_cols, prefix_mask, X.dtype.element_ty, SCALED_PREFIX)
        largest_p = tl.abs(p0)
        if THIRDS:
            p1 = _prefix(p_row, ps_row, BLOCK_P + prefix_cols, prefix_mask, X.dtype.element_ty, SCALED_PREFIX)
            p2 = _prefix(p_row, ps_row, 2 * BLOCK_P + prefix_cols, prefix_mask, X.dtype.element_ty, SCALED_PREFIX)
            largest_p = tl.maximum(largest_p, tl.maximum(tl.abs(p1), tl.abs(p2)))
        amax = tl.maximum(amax, tl.max(largest_p, axis=0))
    scale, inverse = e4m3_scale(amax)  # one division per token, products per element (kernels/fp8.py)
    row = OUT + (batch * L + token) * (KP + K)
    dtype = OUT.dtype.element_ty
    if HAS_PREFIX:
        tl.store(row + prefix_cols, e4m3(p0, inverse, dtype), mask=prefix_mask)
        if THIRDS:
            tl.store(row + BLOCK_P + prefix_cols, e4m3(p1, inverse, dtype))
            tl.store(row + 2 * BLOCK_P + prefix_cols, e4m3(p2, inverse, dtype))
    tl.store(row + KP + cols, e4m3(h0, inverse, dtype), mask=mask)
    if THIRDS:
        tl.store(row + KP + BLOCK_K + cols, e4m3(h1, inverse, dtype))
        tl.store(row + KP + 2 * BLOCK_K + cols, e4m3(h2, inverse, dtype))
    tl.store(OUT_SCALE + batch * L + token, scale)


def _check_input(name: str, t: torch.Tensor, dtypes=ACTIVATION_DTYPES) -> None:
    op = "gelu_concat_fp8"
    if t.dim() != 3:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}; expected 3 dims [B, L, K]")
    if t.dtype not in dtypes:
        allowed = "float8_e4m3fn (with prefix_scale)" if dtypes == (FP8_DTYPE,) else "bfloat16, float16, float32"
        raise ValueError(f"{op}: {name} has dtype {t.dtype}; allowed: {allowed}")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{op}: {name} has stride {t.stride(-1)} in its last dim; it must be 1 (call .contiguous())")
    if not 1 <= t.shape[-1] <= MAX_WIDTH or min(t.shape) < 1:
        raise ValueError(f"{op}: {name} {tuple(t.shape)}: need B, L >= 1 and 1 <= K <= {MAX_WIDTH}")


def _check_inputs(prefix: torch.Tensor | None, x: torch.Tensor, prefix_scale: torch.Tensor | None = None) -> None:
    _check_input("x", x)
    if prefix is not None:
        _check_input("prefix", prefix, (FP8_DTYPE,) if prefix_scale is not None else ACTIVATION_DTYPES)
        if prefix.shape[:2] != x.shape[:2] or prefix.device != x.device:
            raise ValueError(
                f"gelu_concat_fp8: prefix {tuple(prefix.shape)} on {prefix.device} and x {tuple(x.shape)} on "
                f"{x.device} must share [B, L] and the device"
            )
    if prefix_scale is None:
        return
    if prefix is None:  # (these checks keep the line count of 6aa1849's: the shipped frames check traced lines)
        raise ValueError("gelu_concat_fp8: prefix_scale was given without a prefix; pass the e4m3 prefix it scales")
    expected = (x.shape[0], prefix.shape[2])
    if (
        prefix_scale.shape != expected
        or prefix_scale.dtype != torch.float32
        or prefix_scale.stride(-1) != 1 or prefix_scale.device != x.device
    ):
        raise ValueError(
            f"gelu_concat_fp8: prefix_scale {tuple(prefix_scale.shape)} {prefix_scale.dtype} on {prefix_scale.device}: "
            f"expected float32 [B, Kp] = {list(expected)} on {x.device}, last dim contiguous, beside an e4m3 prefix "
            "(one scale per batch element and prefix column)"
        )


@functools.cache
def _num_warps(block_k: int) -> int:
    # ~32 fp32 values of the row per thread; 4 under the interpreter (its cost is per program, not per thread).
    # Cached: the interpreter is chosen once, at import, and this runs on every launch.
    return 4 if triton_interpreting() else max(4, min(16, block_k // 1024))


def _thirds(width: int) -> bool:
    """Whether a row of `width` reads as three power-of-two chunks of >= 16 (FLUX's 3072 and 12288)."""
    third, rest = divmod(width, 3)
    return rest == 0 and third >= 16 and third & (third - 1) == 0


def gelu_concat_fp8_fwd(
    prefix: torch.Tensor | None, x: torch.Tensor, prefix_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks, allocates and launches; see gelu_concat_fp8."""
    _check_inputs(prefix, x, prefix_scale)
    if not x.is_cuda:
        check_runnable(x.device, "gelu_concat_fp8")
    batch, tokens, width = x.shape
    prefix_width = 0 if prefix is None else prefix.shape[2]
    out = new_output(batch, tokens, prefix_width + width, dtype=FP8_DTYPE, device=x.device)
    scale = new_output(batch, tokens, 1, dtype=torch.float32, device=x.device)
    p = x if prefix is None else prefix  # placeholder pointers where there is no prefix, or no prefix scale
    ps = x if prefix_scale is None else prefix_scale
    thirds = _thirds(width) and (prefix is None or _thirds(prefix_width))
    block_k = width // 3 if thirds else triton.next_power_of_2(width)
    block_p = prefix_width // 3 if thirds and prefix is not None else triton.next_power_of_2(max(prefix_width, 1))
    with device_guard(x):
        _gelu_concat_fp8_kernel[(tokens, batch)](
            p, x, out, scale, p.stride(0), p.stride(1), x.stride(0), x.stride(1), tokens, prefix_width, width,
            HAS_PREFIX=prefix is not None, BLOCK_P=block_p, BLOCK_K=block_k, APPROX_DIVIDE=not triton_interpreting(),
            THIRDS=thirds, PREFIX_SCALE=ps, stride_ps_b=ps.stride(0), SCALED_PREFIX=prefix_scale is not None,
            num_warps=_num_warps(triton.next_power_of_2(width)),
        )  # fmt: skip
    return out, scale


@torch.library.custom_op("flux_kernels::gelu_concat_fp8", mutates_args=())
def _gelu_concat_fp8_op(
    prefix: torch.Tensor | None, x: torch.Tensor, prefix_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    return gelu_concat_fp8_fwd(prefix, x, prefix_scale)


@_gelu_concat_fp8_op.register_fake
def _gelu_concat_fp8_fake(prefix, x, prefix_scale=None):
    _check_inputs(prefix, x, prefix_scale)
    width = x.shape[2] + (0 if prefix is None else prefix.shape[2])
    return x.new_empty((*x.shape[:2], width), dtype=FP8_DTYPE), x.new_empty((*x.shape[:2], 1), dtype=torch.float32)


def gelu_concat_fp8(
    prefix: torch.Tensor | None, x: torch.Tensor, prefix_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cat([prefix, gelu(x, approximate='tanh')], -1) quantised per token for an fp8 GEMM: (q float8_e4m3fn
    [B, L, Kp + K], scale fp32 [B, L, 1]) with q * scale ~= the fp32 result. prefix: [B, L, Kp] or None;
    x: [B, L, K], K and Kp <= 16384, last dims contiguous. prefix_scale (fp32 [B, Kp]): the prefix is e4m3 codes
    whose values are codes * prefix_scale[b, column], rounded to x's dtype (the cuDNN attention core's output, its
    V channel scales applied here instead of in a pass of their own: gelu_concat_fp8_ref(dequantize_prefix(...),
    x) bit for bit)."""
    if torch.compiler.is_compiling():
        return _gelu_concat_fp8_op(prefix, x, prefix_scale)
    return gelu_concat_fp8_fwd(prefix, x, prefix_scale)


def dequantize_prefix(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 codes [B, L, Kp] times their column scales [B, Kp], in `dtype`: the prefix value gelu_concat_fp8 reads
    from (codes, prefix_scale), and what a path without it materialises."""
    return (codes.float() * scale[:, None, :]).to(dtype)


__all__ = ["dequantize_prefix", "gelu_concat_fp8", "gelu_concat_fp8_fwd", "gelu_concat_fp8_ref"]
