"""The fp8 (float8 e4m3) row-wise quantiser shared by the engine's Fp8Linear (engine.quantize) and the norm
kernels' fp8 outputs (kernels.norm.*_fp8, whose reference it is). Plain PyTorch, no Triton.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
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


__all__ = ["E4M3_MAX", "FP8_DTYPE", "MIN_SCALE", "quantize_fp8_rowwise"]
