"""kernels/group_norm.py: GroupNorm with split statistics against F.group_norm (fp32 reference), its fallbacks and
its checks. On a machine without CUDA: the Triton interpreter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flux_kernels
from flux_kernels import group_norm as module
from flux_kernels.group_norm import group_norm, group_norm_fwd, runs_here


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(flux_kernels, "POISON_OUTPUTS", True)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 values loaded 16 at a time (contiguous), tiles of 32 values and chunks of 64 (channels
    innermost): several chunks per group, a partial last one, on small shapes."""
    monkeypatch.setattr(module, "CHUNK", 64)
    monkeypatch.setattr(module, "BLOCK", 16)
    monkeypatch.setattr(module, "TILE", 32)
    monkeypatch.setattr(module, "CHANNELS_CHUNK", 64)


def channels_last(x):
    """x [N, C, *spatial] stored channels innermost (channels_last for 4D)."""
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def make(shape, dtype, device, offset=0.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator) * 3 + offset
    channels = shape[1]
    weight = torch.randn(channels, generator=generator)
    bias = torch.randn(channels, generator=generator)
    return x.to(device, dtype), weight.to(device, dtype), bias.to(device, dtype)


@pytest.mark.parametrize("shape, groups", [((1, 8, 16, 16), 4), ((2, 6, 5, 7), 3), ((1, 4, 9), 2), ((3, 2, 1, 1), 1)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_torch_in_fp32(shape, groups, affine, layout, device, small_chunks):
    x, weight, bias = make(shape, torch.float32, device)
    if layout == "channels_last":
        x = channels_last(x)
        assert module.channels_innermost(x) and (not x.is_contiguous() or shape[1] == 1 or x[0, 0].numel() == 1)
    if not affine:
        weight = bias = None
    out = group_norm_fwd(x, groups, weight, bias, 1e-6)
    assert out.stride() == x.stride()
    # fp32, another summation order (chunks, then their sums): measured 1.4e-6; a wrong mean, variance or
    # channel-to-group mapping is off by >= 1e-1
    torch.testing.assert_close(out, F.group_norm(x, groups, weight, bias, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_a_large_mean_does_not_cancel_the_variance(layout, device, small_chunks):
    """Values 1000 away from zero with a spread of 3: sum(x^2) / n - mean^2 in fp32 would lose ~13 of its 24 bits;
    the shifted sums keep the variance."""
    x, weight, bias = make((1, 4, 32, 32), torch.float32, device, offset=1000.0)
    x = channels_last(x) if layout == "channels_last" else x
    out = group_norm_fwd(x, 2, weight, bias, 1e-6)
    reference = F.group_norm(x.double(), 2, weight.double(), bias.double(), 1e-6).float()
    # measured 7.2e-5 (PyTorch's own fp32 GroupNorm: 2.1e-5; x's fp32 ulp at 1000 is 6e-5); unshifted sums: ~1e-2
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bf16_rounds_once(layout, device, small_chunks):
    x, weight, bias = make((2, 8, 12, 12), torch.bfloat16, device)
    x = channels_last(x) if layout == "channels_last" else x
    out = group_norm_fwd(x, 4, weight, bias, 1e-6)
    assert out.dtype == torch.bfloat16
    reference = F.group_norm(x.float(), 4, weight.float(), bias.float(), 1e-6)
    # one rounding of the fp32 result to bf16, as PyTorch's bf16 GroupNorm: measured 0.029 at values up to 5.4 (1 ulp)
    torch.testing.assert_close(out.float(), reference, rtol=2**-7, atol=2**-7)


def test_other_layouts_go_to_torch(device):
    x, weight, bias = make((1, 8, 6, 6), torch.float32, device)
    transposed = x.transpose(2, 3)  # neither contiguous nor channels innermost
    assert runs_here(x) and runs_here(channels_last(x)) and not runs_here(transposed)
    assert torch.equal(group_norm(transposed, 4, weight, bias), F.group_norm(transposed, 4, weight, bias))
    assert not runs_here(x.int()) and not runs_here(x[:0]) and not runs_here(x[0, 0])


def test_groups_that_do_not_divide_the_channels_are_an_error(device):
    x, _, _ = make((1, 6, 4, 4), torch.float32, device)
    with pytest.raises(ValueError, match="6 channels do not split into 4 groups"):
        group_norm_fwd(x, 4, None, None, 1e-6)


def test_one_grid_axis_takes_every_vae_shape():
    """The programs go on the grid's x axis (2^31 - 1): the 2048^2 decode's NHWC apply has 262,144 blocks of pixels
    at 256 channels, past the y axis's 65535 (the first GPU run failed there: 'invalid argument')."""
    assert module.grid(1, 262144) == (262144,) and module.grid(32, 1024) == (32768,)
    with pytest.raises(ValueError, match=r"2147483648 programs, more than a CUDA grid takes \(2\^31 - 1\)"):
        module.grid(2**16, 2**15)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("channels, size", [(128, 1024), (256, 2048)])
@pytest.mark.parametrize("fused", [False, True])
def test_the_vae_shapes_on_the_gpu(layout, channels, size, fused, device):
    """The FLUX VAE's GroupNorms at 1024^2 and 2048^2 (32 groups) with the default chunks, bf16; fused: with the
    convolution's bias and the SiLU, as a ResnetBlock2D's second norm runs."""
    x, weight, bias = make((1, channels, size, size), torch.bfloat16, device)
    x = channels_last(x) if layout == "channels_last" else x
    input_bias = torch.randn(channels, device=device, dtype=torch.bfloat16) if fused else None
    out = group_norm_fwd(x, 32, weight, bias, 1e-6, input_bias=input_bias, silu=fused)
    x = x.float() + input_bias.float().view(1, -1, 1, 1) if fused else x.float()
    reference = F.group_norm(x, 32, weight.float(), bias.float(), 1e-6)
    reference = F.silu(reference) if fused else reference
    torch.testing.assert_close(out.float(), reference, rtol=2**-7, atol=2**-7)


@pytest.mark.parametrize("shape, groups", [((1, 8, 16, 16), 4), ((2, 6, 5, 7), 3), ((1, 4, 9), 2)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("silu", [False, True])
def test_an_input_bias_and_silu_match_torch_in_fp32(shape, groups, layout, silu, device, small_chunks):
    """The convolution's bias added where the norm reads (chunks of 64 values span both channels of a group at
    5 x 7 pixels), SiLU where it writes: as x + bias, F.group_norm, F.silu."""
    x, weight, bias = make(shape, torch.float32, device)
    input_bias = torch.randn(shape[1], generator=torch.Generator().manual_seed(9)).to(device) * 4
    x = channels_last(x) if layout == "channels_last" else x
    out = group_norm_fwd(x, groups, weight, bias, 1e-6, input_bias=input_bias, silu=silu)
    reference = module.group_norm_ref(x, groups, weight, bias, 1e-6, input_bias=input_bias, silu=silu)
    # fp32, another summation order: measured 3.3e-6; the bias ignored in the statistics or the output (or its
    # channel mapping off by one) is off by >= 1e-1
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, module.group_norm_ref(x, groups, weight, bias, 1e-6, silu=silu), atol=1e-2)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_a_large_input_bias_does_not_cancel_the_variance(layout, device, small_chunks):
    """A bias of 1000 on values with a spread of 3: the shift includes the bias, as for a large mean."""
    x, weight, bias = make((1, 4, 32, 32), torch.float32, device)
    x = channels_last(x) if layout == "channels_last" else x
    input_bias = torch.full((4,), 1000.0, device=device) + torch.arange(4.0, device=device)
    out = group_norm_fwd(x, 2, weight, bias, 1e-6, input_bias=input_bias)
    reference = F.group_norm(x.double() + input_bias.double().view(1, -1, 1, 1), 2, weight.double(), bias.double(),
                             1e-6).float()  # fmt: skip
    # measured 1.5e-5 (as the large mean above): the bias never enters the fp32 sums (x - shift is small)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


def test_the_fallback_takes_the_input_bias_and_silu(device):
    x, weight, bias = make((1, 8, 6, 6), torch.float32, device)
    transposed = x.transpose(2, 3)
    input_bias = torch.randn(8, generator=torch.Generator().manual_seed(3)).to(device)
    expected = F.silu(F.group_norm(transposed + input_bias.view(1, -1, 1, 1), 4, weight, bias))
    assert torch.equal(group_norm(transposed, 4, weight, bias, input_bias=input_bias, silu=True), expected)
    with pytest.raises(ValueError, match=r"input_bias of shape \(7,\), expected \(8,\)"):
        group_norm_fwd(x, 4, weight, bias, 1e-6, input_bias=input_bias[:7])
