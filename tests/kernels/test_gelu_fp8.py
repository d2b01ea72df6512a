"""kernels/gelu_fp8.py: gelu_concat_fp8 against quantize_fp8_rowwise of the fp32 reference (the same rule as the
norm kernels' fp8 outputs: scales to a few fp32 ulps, e4m3 codes equal but for rare one-code flips on rounding
boundaries), its checks, its custom op and its compile. On a machine without CUDA: the Triton interpreter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_tolerance import assert_fp8_rows_match

import flux_kernels
from flux_kernels import gelu_fp8 as gelu_module
from flux_kernels.fp8 import E4M3_MAX
from flux_kernels.gelu_fp8 import gelu_concat_fp8, gelu_concat_fp8_ref


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(flux_kernels, "POISON_OUTPUTS", True)


def make_inputs(batch, tokens, width, prefix_width, dtype, device, strided=False, seed=0):
    """x as the MLP half of a fused projection (a slice when strided, as linear1's output is), prefix as an
    attention output [B, L, Kp]."""
    generator = torch.Generator().manual_seed(seed + tokens + width)
    full = width + 64 if strided else width
    x = (torch.randn(batch, tokens, full, generator=generator) * 2).to(device, dtype)[..., full - width :]
    prefix = None
    if prefix_width:
        prefix = torch.randn(batch, tokens, prefix_width, generator=generator).to(device, dtype)
    return prefix, x


SHAPES = [(1, 1, 64, 0), (2, 33, 384, 128), (1, 65, 1000, 96), (2, 17, 200, 0)]


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("batch, tokens, width, prefix_width", SHAPES)
def test_gelu_concat_fp8_matches_quantized_reference(batch, tokens, width, prefix_width, dtype, strided, device):
    prefix, x = make_inputs(batch, tokens, width, prefix_width, dtype, device, strided)
    q, scale = gelu_concat_fp8(prefix, x)
    assert_fp8_rows_match(q, scale, *gelu_concat_fp8_ref(prefix, x), (batch, tokens, prefix_width + width))


def test_gelu_concat_fp8_is_tanh_gelu_then_the_prefix_first(device):
    """The prefix lands first and is not activated (negative values survive); the GELU is the tanh one."""
    prefix = -torch.ones(1, 2, 8, device=device)
    x = torch.linspace(-3, 3, 16, device=device).repeat(1, 2, 1)
    q, scale = gelu_concat_fp8(prefix, x)
    dequantized = q.float() * scale
    torch.testing.assert_close(dequantized[..., :8], prefix, rtol=0.07, atol=0)  # e4m3: 3 mantissa bits
    torch.testing.assert_close(dequantized[..., 8:], F.gelu(x, approximate="tanh"), rtol=0.07, atol=2e-3)
    assert (q.float().abs().amax(dim=-1) == E4M3_MAX).all()


def test_a_nan_stays_nan_and_stays_in_its_row(device):
    """A NaN input (an fp16 overflow upstream) must not be clamped into a finite +-448: it stays NaN, so the fp8
    GEMM's output row is NaN as with quantize_fp8_rowwise; the other rows are untouched."""
    prefix, x = make_inputs(1, 4, 64, 16, torch.float32, device)
    x[0, 1, 5] = float("nan")
    prefix[0, 2, 3] = float("nan")
    q, scale = gelu_concat_fp8(prefix, x)
    values = q.float()
    assert torch.isnan(values[0, 1, 16 + 5]) and torch.isnan(values[0, 2, 3])
    assert torch.isfinite(values[0, [0, 3]]).all() and torch.isfinite(scale).all()
    ref_q, ref_scale = gelu_concat_fp8_ref(prefix[:, [0, 3]], x[:, [0, 3]])
    assert torch.equal(values[0, [0, 3]], ref_q.float()[0])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p, x: (p, x[0]), r"x has shape \(3, 64\); expected 3 dims"),
        (lambda p, x: (p, x.int()), r"x has dtype torch.int32"),
        (lambda p, x: (p, x.transpose(1, 2).contiguous().transpose(1, 2)), r"x has stride 3 in its last dim"),
        (lambda p, x: (p[:, :2], x), r"prefix \(2, 2, 16\) on cpu and x \(2, 3, 64\) on cpu must share \[B, L\]"),
        (lambda p, x: (p, torch.zeros(2, 3, 16385)), r"need B, L >= 1 and 1 <= K <= 16384"),
    ],
    ids=["x_2d", "x_int", "x_last_stride", "prefix_tokens", "too_wide"],
)
def test_gelu_concat_fp8_bad_inputs(change, message):
    prefix, x = make_inputs(2, 3, 64, 16, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match=message):
        gelu_concat_fp8(*change(prefix, x))


def test_gelu_concat_fp8_custom_op_and_compile(monkeypatch, device):
    prefix, x = make_inputs(2, 5, 96, 32, torch.bfloat16, device, strided=True)
    torch.library.opcheck(torch.ops.flux_kernels.gelu_concat_fp8.default, (prefix, x))
    torch.library.opcheck(torch.ops.flux_kernels.gelu_concat_fp8.default, (None, x))
    eager = gelu_concat_fp8(prefix, x)
    torch._dynamo.reset()
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    compiled = torch.compile(gelu_concat_fp8, fullgraph=True, backend=backend)(prefix, x)
    for got, want in zip(compiled, eager, strict=True):
        assert torch.equal(got.float(), want.float())

    def refuse(*args, **kwargs):
        raise AssertionError("an eager call went through the custom op")

    monkeypatch.setattr(gelu_module, "_gelu_concat_fp8_op", refuse)
    assert torch.equal(gelu_concat_fp8(prefix, x)[0].float(), eager[0].float())


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [4608, 16896])
def test_gelu_concat_fp8_flux_shapes(tokens, device):
    for prefix_width in (0, 3072):  # double-stream MLP output; single-stream proj_out input
        prefix, x = make_inputs(1, tokens, 12288, prefix_width, torch.bfloat16, device, strided=True)
        q, scale = gelu_concat_fp8(prefix, x)
        assert_fp8_rows_match(q, scale, *gelu_concat_fp8_ref(prefix, x), (1, tokens, prefix_width + 12288))
