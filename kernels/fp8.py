"""float8 e4m3 quantisation, in PyTorch and in Triton.

quantize_fp8_rowwise: the per-row quantiser (plain PyTorch) shared by the engine's Fp8Linear (engine.quant.fp8)
    and, as their reference, the kernels with fp8 outputs (flux_kernels.layernorm_modulate's *_fp8 ops,
    flux_kernels.gelu_fp8).
e4m3_scale, e4m3: the same arithmetic as @triton.jit functions, which those kernels call on their fp32 rows.
quantize_int8_ref / int8_codes: per-row symmetric int8 (amax / 127), in PyTorch and in Triton: the Q and K of the
    quantised attention (flux_kernels.fp8_attention; written by flux_kernels.qk_norm_rope's int8 variant).
"""

from __future__ import annotations

import importlib.util

import torch

FP8_DTYPE = torch.float8_e4m3fn
INT8_MAX = 127.0  # int8 codes are symmetric: -127..127
E4M3_MAX = 448.0  # largest finite float8_e4m3fn; the cast does not saturate (it makes NaN), so we clamp
# the smallest scale: the smallest normal fp32. A zero row gets q = 0 (no 0/0); rows down to amax ~5e-36 keep full
# precision (a 1e-12 floor measured: rows of bf16 values ~1e-30 flushed to zero)
MIN_SCALE = torch.finfo(torch.float32).tiny


def quantize_fp8_rowwise(
    x: torch.Tensor, check_finite: bool = False, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q e4m3 [..., K], scale fp32 [..., 1]) with x ~= q * scale; scale = amax(|row|) / 448.

    Round to nearest even (the cast), clamped to +-448 first: whether the cast itself saturates or makes NaN
    past 448 has differed between torch versions and devices. `scale` [..., 1] (static scaling) overrides
    the amax one; values past 448 * scale then saturate to +-448.
    A zero row gives q = 0 and a tiny positive scale. check_finite raises on inf/nan (a host sync: used for
    weights, not per activation); unchecked, a non-finite value makes its row's output NaN.
    """
    if check_finite:
        bad = (~torch.isfinite(x)).sum().item()
        if bad:
            raise ValueError(
                f"tensor of shape {tuple(x.shape)} has {bad} inf/nan values; fp8 cannot represent them "
                "(fix the weights: a checkpoint saved in fp16 may have overflowed)"
            )
    x32 = x.float()
    if scale is None:
        amax = x32.abs().amax(dim=-1, keepdim=True)
        scale = (amax / E4M3_MAX).clamp(min=MIN_SCALE)
    q = (x32 / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_int8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 [..., D], fp32 scale [...]) with x ~= q * scale: scale = amax / 127 (floored at the
    smallest normal fp32), q = x * (1 / scale) rounded half away from zero, as the kernels compute it."""
    x32 = x.float()
    amax = x32.abs().amax(-1)
    # a tensor divisor: PyTorch divides by a Python scalar as a product with its reciprocal (1 ulp off div_rn)
    scale = (amax / torch.full_like(amax, INT8_MAX)).clamp(min=MIN_SCALE)
    y = x32 * (1.0 / scale)[..., None]
    q = torch.trunc(y + torch.where(y >= 0, 0.5, -0.5)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


# ============================================================================= Triton: the kernels' fp8 outputs


# fp8 outputs (the *_fp8 ops): e4m3 values and one fp32 scale per token, as quantize_fp8_rowwise above computes
# them (scale = amax / 448, floored at the smallest normal fp32; round-to-nearest-even), but from the fp32
# normalised row: no bf16 rounding in between. The values are multiplied by the row's reciprocal scale, not divided
# by the scale: an IEEE division per element (div_rn) made the kernel 2x slower than the bf16 one on an H100
# (162 vs 80 us at L=16896); the product is within an fp32 ulp of the quotient, so an e4m3 code differs only where
# the quotient sits on a rounding boundary (the tests allow one code off, rarely). Non-finite inputs: a NaN value
# stays NaN (the clamp propagates it, so the fp8 GEMM's output row is NaN, as with quantize_fp8_rowwise) but the
# row's scale and its other values stay finite (tl.max skips NaN), where quantize_fp8_rowwise makes them NaN too.
# TL_E4M3_MAX is E4M3_MAX as a constexpr (a @triton.jit function reads only constexpr globals); its own name, since
# E4M3_MAX stays the plain float that engine.quant and the tests read.
# Triton is a Linux-only dependency: without it (macOS, Windows) the plain PyTorch quantiser above still serves the
# engine's Fp8Linear, and only the kernels are missing.
if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    TL_E4M3_MAX = tl.constexpr(448.0)
    FP8_MIN_SCALE = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny

    @triton.jit
    def e4m3_scale(amax):
        """(scale, 1 / scale) of a token from its fp32 amax: amax / 448, floored at the smallest normal fp32."""
        scale = tl.maximum(tl.math.div_rn(amax, TL_E4M3_MAX), FP8_MIN_SCALE)
        return scale, tl.math.div_rn(1.0, scale)

    @triton.jit
    def e4m3(values, inverse_scale, dtype: tl.constexpr):
        """fp32 values times their token's 1 / scale, clamped to +-448 (NaN kept), rounded to nearest even e4m3."""
        q = tl.clamp(values * inverse_scale, -TL_E4M3_MAX, TL_E4M3_MAX, propagate_nan=tl.PropagateNan.ALL)
        return q.to(dtype, fp_downcast_rounding="rtne")

    @triton.jit
    def int8_codes(values, amax):
        """(int8 codes, fp32 scale) of fp32 rows from their amax, as quantize_int8_ref: scale = amax / 127 floored at
        the smallest normal fp32, codes = values * (1 / scale) rounded half away from zero."""
        scale = tl.maximum(tl.math.div_rn(amax, 127.0), FP8_MIN_SCALE)
        y = values * tl.expand_dims(tl.math.div_rn(1.0, scale), -1)
        y = tl.where(y >= 0, y + 0.5, y - 0.5)
        codes = tl.clamp(y, -127.0, 127.0).to(tl.int32).to(tl.int8)  # the cast truncates: half away from zero
        return codes, scale


__all__ = [
    "E4M3_MAX",
    "FP8_DTYPE",
    "FP8_MIN_SCALE",
    "INT8_MAX",
    "MIN_SCALE",
    "TL_E4M3_MAX",
    "e4m3",
    "e4m3_scale",
    "int8_codes",
    "quantize_fp8_rowwise",
    "quantize_int8_ref",
]
