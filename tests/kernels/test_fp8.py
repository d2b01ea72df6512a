"""kernels/fp8.py: quantize_fp8_rowwise, the per-row e4m3 quantiser that Fp8Linear uses and that the fp8-output
kernels are checked against. Plain PyTorch: runs on the CPU as on a GPU."""

from __future__ import annotations

import pytest
import torch

from flux_kernels.fp8 import E4M3_MAX, FP8_DTYPE, MIN_SCALE, quantize_fp8_rowwise


def sqnr_db(signal: torch.Tensor, approximation: torch.Tensor) -> float:
    noise = (signal - approximation).pow(2).sum()
    return float(10 * torch.log10(signal.pow(2).sum() / noise))


def random_rows(*shape, dtype=torch.float32, device="cpu", seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_scales_are_the_row_amax_over_448(dtype, device):
    x = random_rows(3, 5, 64, dtype=dtype, device=device) * torch.logspace(-3, 3, 5, device=device)[None, :, None]
    q, scale = quantize_fp8_rowwise(x)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (3, 5, 1)
    expected = x.float().abs().amax(dim=-1, keepdim=True) / E4M3_MAX
    assert torch.equal(scale, expected)
    # the largest value of every row lands on +-448 exactly
    assert torch.equal(q.float().abs().amax(dim=-1), torch.full((3, 5), E4M3_MAX, device=device))


def test_codes_are_torchs_e4m3_cast_of_x_over_scale(device):
    x = random_rows(16, 256, device=device, seed=1) * 3.0
    q, scale = quantize_fp8_rowwise(x)
    expected = (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))  # bit for bit
    # and q * scale is x to e4m3's precision: 3 mantissa bits, a relative step of 2^-3 at most (normal range)
    normal = (x / scale).abs() >= 2.0**-6
    relative = ((q.float() * scale - x).abs() / x.abs())[normal]
    assert relative.max() <= 2.0**-4 + 1e-6


def test_all_zero_rows_give_zero_codes_and_the_floor_scale(device):
    x = random_rows(4, 32, device=device, seed=2)
    x[1] = 0.0
    x[3] = 0.0
    q, scale = quantize_fp8_rowwise(x)
    assert (q[[1, 3]].float() == 0).all()  # no 0 / 0
    assert (scale[[1, 3]] == MIN_SCALE).all() and torch.finfo(torch.float32).tiny == MIN_SCALE
    assert torch.isfinite(q.float()).all() and torch.isfinite(scale).all()
    assert torch.equal(scale[[0, 2]], x[[0, 2]].abs().amax(dim=-1, keepdim=True) / E4M3_MAX)


def test_tiny_rows_keep_full_precision_through_the_floor(device):
    # rows of ~1e-30 are above the floor (amax / 448 > tiny): their codes are those of the same rows at ~1, but
    # for rare one-code flips where scaling by 1e-30 moved a quotient across a rounding boundary
    x = random_rows(2, 64, device=device, seed=3)
    q_tiny, scale_tiny = quantize_fp8_rowwise(x * 1e-30)
    q, _ = quantize_fp8_rowwise(x)
    assert (scale_tiny > MIN_SCALE).all()
    assert (q_tiny.view(torch.uint8) == q.view(torch.uint8)).float().mean() >= 0.95
    dequantized = q_tiny.double() * scale_tiny.double() / 1e-30  # in fp64: squares of 1e-30 underflow fp32
    assert sqnr_db(x.double(), dequantized) >= 25.0


def test_a_nan_row_stays_nan_and_leaves_the_other_rows_alone(device):
    x = random_rows(3, 32, device=device, seed=4)
    x[1, 7] = float("nan")
    q, scale = quantize_fp8_rowwise(x)
    assert torch.isnan(scale[1]).all() and torch.isnan(q[1].float()).all()  # the GEMM's output row is NaN
    clean_q, clean_scale = quantize_fp8_rowwise(x[[0, 2]])
    assert torch.equal(q[[0, 2]].view(torch.uint8), clean_q.view(torch.uint8))
    assert torch.equal(scale[[0, 2]], clean_scale)


def test_check_finite_raises_on_inf_and_nan(device):
    x = random_rows(2, 8, device=device, seed=5)
    x[0, 0] = float("inf")
    x[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"shape \(2, 8\) has 2 inf/nan values"):
        quantize_fp8_rowwise(x, check_finite=True)


def test_a_static_scale_saturates_past_448(device):
    x = torch.tensor([[1.0, -2.0, 1000.0, -1000.0]], device=device)
    q, scale = quantize_fp8_rowwise(x, scale=torch.tensor([[1.0]], device=device))
    assert scale.item() == 1.0
    assert q.float().tolist() == [[1.0, -2.0, E4M3_MAX, -E4M3_MAX]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sqnr_on_random_normal_data(dtype, device):
    x = random_rows(64, 3072, dtype=dtype, device=device, seed=6)
    q, scale = quantize_fp8_rowwise(x)
    assert sqnr_db(x.float(), q.float() * scale) >= 25.0
