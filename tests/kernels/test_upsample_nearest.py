"""kernels/upsample_nearest.py: nearest 2x upsampling of channels_last images, equal to F.interpolate value for
value; its fallbacks. On a machine without CUDA: the Triton interpreter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flux_kernels
from flux_kernels import upsample_nearest as module
from flux_kernels.upsample_nearest import runs_here, upsample_nearest2x, upsample_nearest2x_fwd


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(flux_kernels, "POISON_OUTPUTS", True)


def image(shape, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(device, dtype).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(1, 8, 4, 4), (2, 6, 5, 7), (1, 3, 1, 9), (3, 16, 3, 2)])
@pytest.mark.parametrize("tile", [32, 8192])  # several pixels a program (and a partial last tile); one program
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_f_interpolate(shape, tile, dtype, device, monkeypatch):
    monkeypatch.setattr(module, "TILE", tile)
    x = image(shape, dtype, device)
    assert runs_here(x)
    out = upsample_nearest2x_fwd(x)
    expected = F.interpolate(x, scale_factor=2.0, mode="nearest")
    assert out.is_contiguous(memory_format=torch.channels_last) and out.shape == expected.shape
    assert torch.equal(out, expected)  # copies: exact, and no poisoned value left


def test_other_layouts_go_to_f_interpolate(device):
    x = image((1, 8, 4, 4), torch.float32, device)
    contiguous = x.contiguous()
    assert not runs_here(contiguous) and not runs_here(x[:, :, :0]) and not runs_here(x[0])
    assert torch.equal(upsample_nearest2x(contiguous), F.interpolate(contiguous, scale_factor=2.0, mode="nearest"))
    assert upsample_nearest2x(contiguous).is_contiguous()


@pytest.mark.gpu
@pytest.mark.parametrize("channels, size", [(256, 1024), (512, 512)])
def test_the_vae_shapes_on_the_gpu(channels, size, device):
    """The 2048^2 decode's last upsampling (to 2048^2, 256 channels) and the middle one's, bf16."""
    x = image((1, channels, size, size), torch.bfloat16, device)
    assert torch.equal(upsample_nearest2x_fwd(x), F.interpolate(x, scale_factor=2.0, mode="nearest"))
