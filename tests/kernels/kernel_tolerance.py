"""The house tolerance rule for kernels, in one place.

A kernel's error against an fp32 reference must be within `factor` (2x) of the error that the same-dtype
PyTorch implementation makes against that reference, plus a small atol (flash-attention's
tests/ops/triton/test_layer_norm.py). Errors are max-abs over the whole output, so a single wrong or
unwritten element fails; outputs must also be finite (the launchers' NaN poisoning shows unwritten ones).

The atol is 1e-5 plus one final rounding of the output dtype at the reference's largest magnitude
(eps/2 * max|ref|): a kernel can be no better than correctly rounded, while PyTorch's several roundings
can, on a small output, happen to land closer than half an ulp on the few largest elements.
"""

from __future__ import annotations

import contextlib

import torch

DEFAULT_ATOL = 1e-5


@contextlib.contextmanager
def full_fp32_matmul():
    """fp32 references must not run on TF32 tensor cores (a global switch other code may have flipped)."""
    if not torch.cuda.is_available():
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def max_abs_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return (actual.float() - reference.float()).abs().max().item()


def assert_within_pytorch_error(
    actual: torch.Tensor,
    reference_fp32: torch.Tensor,
    reference_same_dtype: torch.Tensor,
    *,
    factor: float = 2.0,
    atol: float = DEFAULT_ATOL,
    name: str = "output",
) -> tuple[float, float]:
    """Assert max|actual - ref32| <= factor * max|ref_same_dtype - ref32| + atol; returns both errors."""
    assert actual.shape == reference_fp32.shape == reference_same_dtype.shape, (
        f"{name}: shapes differ: kernel {tuple(actual.shape)}, fp32 ref {tuple(reference_fp32.shape)}, "
        f"same-dtype ref {tuple(reference_same_dtype.shape)}"
    )
    finite = torch.isfinite(actual)
    assert finite.all(), f"{name}: {(~finite).sum().item()} non-finite elements (unwritten output?)"
    kernel_error = max_abs_error(actual, reference_fp32)
    torch_error = max_abs_error(reference_same_dtype, reference_fp32)
    if actual.dtype != torch.float32:
        atol += 0.5 * torch.finfo(actual.dtype).eps * reference_fp32.abs().max().item()
    assert kernel_error <= factor * torch_error + atol, (
        f"{name}: kernel max abs error {kernel_error:.3g} > {factor} x PyTorch {reference_same_dtype.dtype} error "
        f"{torch_error:.3g} + atol {atol:.3g}"
    )
    return kernel_error, torch_error


# ----------------------------------------------------------------------------- fp8 outputs


def assert_fp8_rows_match(q, q_scale, ref_q, ref_scale, shape):
    """The kernel's e4m3 values and per-token scales against quantize_fp8_rowwise of the fp32 reference.

    The kernel's fp32 arithmetic differs from torch's in the last bits (another summation order, a product by the
    reciprocal scale instead of a quotient), so a scale may differ by a few fp32 ulps and a value that sits on a
    rounding boundary may land on the neighbouring e4m3 code: allowed, one code at most, for under 1% of the
    values. Everything else is bit-equal."""
    assert q.dtype == torch.float8_e4m3fn and q.shape == shape and q.is_contiguous()
    assert q_scale.dtype == torch.float32 and q_scale.shape == (*shape[:2], 1)
    torch.testing.assert_close(q_scale, ref_scale, rtol=1e-5, atol=0)
    values, ref_values = q.float(), ref_q.float()
    assert torch.isfinite(values).all(), "unwritten or non-finite fp8 outputs"
    # every row reaches the full e4m3 range: its largest value is +-448 (rows that are all zero excepted)
    row_amax = values.abs().amax(dim=-1)
    assert ((row_amax == 448.0) | (ref_values.abs().amax(dim=-1) == 0)).all()
    off = values != ref_values
    assert off.float().mean().item() < 0.01, f"{off.sum().item()} of {off.numel()} e4m3 values differ"
    # neighbouring codes: e4m3fn's low 7 bits order the magnitudes, the top bit is the sign
    codes, ref_codes = q.view(torch.uint8).int(), ref_q.view(torch.uint8).int()
    magnitude, ref_magnitude = codes & 0x7F, ref_codes & 0x7F
    same_sign = ((codes >> 7) == (ref_codes >> 7)) | (magnitude == 0) | (ref_magnitude == 0)
    neighbours = same_sign & ((magnitude - ref_magnitude).abs() <= 1)
    assert neighbours[off].all(), "an e4m3 value is more than one code from the reference"
