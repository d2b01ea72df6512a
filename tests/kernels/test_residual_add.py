"""kernels/residual_add.py: a VAE ResnetBlock2D's end, (shortcut + h + bias[c]) / divisor in one pass, against
diffusers' order of PyTorch ops (residual_add_ref); its layouts, fallbacks and checks. On a machine without CUDA: the
Triton interpreter."""

from __future__ import annotations

import pytest
import torch

import flux_kernels
from flux_kernels import residual_add as module
from flux_kernels.residual_add import residual_add, residual_add_fwd, residual_add_ref, runs_here


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(flux_kernels, "POISON_OUTPUTS", True)
    monkeypatch.setattr(module, "BLOCK", 64)  # several programs and a partial last one on small shapes


def make(shape, dtype, device, layout="contiguous", seed=0):
    generator = torch.Generator().manual_seed(seed)
    h, shortcut = (torch.randn(*shape, generator=generator) * 2 for _ in range(2))
    bias = torch.randn(shape[1], generator=generator)
    if layout == "channels_last":
        h, shortcut = (x.to(memory_format=torch.channels_last) for x in (h, shortcut))
    return h.to(device, dtype), shortcut.to(device, dtype), bias.to(device)


@pytest.mark.parametrize("shape", [(1, 8, 16, 16), (2, 6, 5, 7), (1, 3, 1, 9), (1, 128, 4, 4)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("divisor", [1.0, 2.0])
def test_matches_diffusers_order_in_fp32(shape, layout, divisor, device):
    h, shortcut, bias = make(shape, torch.float32, device, layout)
    assert runs_here(h, shortcut)
    out = residual_add_fwd(h, shortcut, bias, divisor)
    assert out.stride() == h.stride()
    # fp32: one rounding against the reference's three, measured 9.5e-7; a wrong channel index (the layouts' one
    # difference) is off by ~1
    torch.testing.assert_close(out, residual_add_ref(h, shortcut, bias, divisor), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bf16_rounds_once_and_writes_in_place(layout, device):
    h, shortcut, bias = make((2, 16, 6, 10), torch.bfloat16, device, layout)
    reference = (shortcut.float() + h.float() + bias.view(1, -1, 1, 1)) / 1.0
    expected_bf16 = residual_add_ref(h, shortcut, bias)
    out = residual_add_fwd(h, shortcut, bias, out=h)
    assert out is h and out.dtype == torch.bfloat16
    # one rounding of the fp32 sum: on the GPU to nearest (half an ulp, the GPU test); Triton's interpreter
    # truncates fp32 -> bf16 (measured: |out| <= |reference| everywhere, 0.058 at ~8): within one ulp (2^-7)
    torch.testing.assert_close(out.float(), reference, rtol=2**-7, atol=2**-7)
    # diffusers' three bf16 roundings differ from it by at most ~1.5 ulp
    torch.testing.assert_close(out.float(), expected_bf16.float(), rtol=2**-6, atol=2**-6)


def test_other_layouts_and_mismatches_go_to_torch(device):
    h, shortcut, bias = make((1, 8, 6, 6), torch.float32, device)
    transposed = h.transpose(2, 3)
    assert not runs_here(transposed, shortcut.transpose(2, 3).contiguous())
    assert not runs_here(h, shortcut.to(memory_format=torch.channels_last))  # strides differ
    assert not runs_here(h, shortcut.double()) and not runs_here(h[:, :, :0], shortcut[:, :, :0])
    mixed = shortcut.to(memory_format=torch.channels_last)
    assert torch.equal(residual_add(h, mixed, bias), residual_add_ref(h, mixed, bias))


def test_bad_bias_divisor_or_out_are_errors(device):
    h, shortcut, bias = make((1, 8, 4, 4), torch.float32, device)
    with pytest.raises(ValueError, match=r"bias of shape \(7,\), expected \(8,\)"):
        residual_add_fwd(h, shortcut, bias[:7])
    with pytest.raises(ValueError, match="divisor 0"):
        residual_add_fwd(h, shortcut, bias, 0.0)
    with pytest.raises(ValueError, match="out must have h's shape, strides and dtype"):
        residual_add_fwd(h, shortcut, bias, out=h.to(memory_format=torch.channels_last))


@pytest.mark.gpu
@pytest.mark.parametrize("channels, size", [(128, 2048), (512, 512)])
def test_the_vae_shapes_on_the_gpu(channels, size, device):
    """The 2048^2 decode's largest block and the middle block's, bf16, channels_last, with the default BLOCK."""
    torch.manual_seed(0)
    h, shortcut = (torch.randn(1, channels, size, size, device=device, dtype=torch.bfloat16)
                   .to(memory_format=torch.channels_last) for _ in range(2))  # fmt: skip
    bias = torch.randn(channels, device=device)
    out = module.residual_add_fwd(h, shortcut, bias)
    reference = shortcut.float() + h.float() + bias.view(1, -1, 1, 1)
    torch.testing.assert_close(out.float(), reference, rtol=2**-8, atol=2**-8)
