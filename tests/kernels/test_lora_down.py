"""kernels/lora_down.py: the adapters' A products on e4m3 activations, scaled per column and laid out as the LoRA
GEMM's `low`, against its fp32 reference and against the path it replaced (A quantised to e4m3, an fp8 GEMM, then
the scale); its checks. On a machine without CUDA: the Triton interpreter (16-row / 16-column tiles, so the shapes
below span several programs and partial tiles)."""

from __future__ import annotations

import pytest
import torch

import flux_kernels
from flux_kernels.fp8 import quantize_fp8_rowwise
from flux_kernels.lora_down import launch_shape, lora_down, lora_down_fwd, lora_down_ref, runs_here


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(flux_kernels, "POISON_OUTPUTS", True)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.float(), out.float()
    return float(20 * torch.log10(ref.norm() / (ref - out).norm()))


def make(m, k, ranks, rank, device, seed=0):
    """e4m3 x with per-row scales; `a` holding adapters of these ranks, each part's rows zero-padded to `rank`; each
    adapter's columns scaled by its own scaling (zero on the padding)."""
    generator = torch.Generator().manual_seed(seed)
    x_fp8, x_scale = quantize_fp8_rowwise(torch.randn(m, k, generator=generator) * 3)
    rows, scales = [], []
    for index, part_rank in enumerate(ranks):
        rows += [torch.randn(part_rank, k, generator=generator) * k**-0.5, torch.zeros(rank - part_rank, k)]
        scales += [torch.full((part_rank,), 0.5 + index), torch.zeros(rank - part_rank)]
    return {"x_fp8": x_fp8.to(device), "x_scale": x_scale.reshape(-1).to(device),
            "a": torch.cat(rows).bfloat16().to(device), "col_scale": torch.cat(scales).to(device)}  # fmt: skip


# (M, K, each part's adapters' rank, padded rank): a fused QKV, a part padded, one token, K not a multiple of the tile
CASES = [(40, 64, [16, 16, 16], 16), (33, 96, [16, 8], 16), (1, 32, [32], 32), (50, 80, [16, 16, 16, 16], 16)]


@pytest.mark.parametrize("m, k, ranks, rank", CASES)
def test_matches_the_fp32_reference(m, k, ranks, rank, device):
    inputs = make(m, k, ranks, rank, device)
    assert runs_here(inputs["x_fp8"])
    out = lora_down_fwd(**inputs)
    assert out.shape == (m, len(ranks) * rank) and out.dtype == torch.bfloat16
    # one bf16 rounding of fp32 sums taken in different orders on both sides: <= 1 bf16 ulp of the output
    torch.testing.assert_close(out.float(), lora_down_ref(**inputs).float(), rtol=2**-7, atol=1e-5)
    for part, part_rank in enumerate(ranks):  # the padding columns are zeros, written (not NaN-poisoned)
        assert out[:, part * rank + part_rank : (part + 1) * rank].float().abs().sum().item() == 0


def test_each_column_takes_its_own_scale(device):
    inputs = make(24, 64, [16, 16], 16, device, seed=2)
    out = lora_down_fwd(**inputs)
    inputs["col_scale"][16:] *= 2
    doubled = lora_down_fwd(**inputs)
    assert torch.equal(doubled[:, :16], out[:, :16])
    assert torch.equal(doubled[:, 16:].float(), out[:, 16:].float() * 2)  # a power of two: exact


def test_close_to_the_path_it_replaced(device):
    """A quantised to e4m3 per row and the fp8 product scaled (engine.quant.fp8.fp8_input_linear's arithmetic, then
    engine.lora_update.scaled): the same values within A's e4m3 rounding, which this kernel no longer makes."""
    inputs = make(64, 128, [16, 16, 16], 16, device, seed=4)
    a_fp8, a_scale = quantize_fp8_rowwise(inputs["a"].float())
    old = (inputs["x_fp8"].float() @ a_fp8.float().t()) * inputs["x_scale"].view(-1, 1) * a_scale.view(1, -1)
    old = (old.bfloat16().float() * inputs["col_scale"].view(1, -1)).bfloat16()
    out = lora_down_fwd(**inputs)
    # e4m3 keeps 3 mantissa bits: A's rounding costs the old path 31.2-32.0 dB (seeds 0-3, measured)
    assert sqnr_db(lora_down_ref(**inputs), old) > 25
    # the kernel: the output's bf16 rounding only; 47.6-47.8 dB under the interpreter, whose fp32 -> bf16 cast
    # truncates (the GPU rounds to nearest: one ulp less)
    assert sqnr_db(lora_down_ref(**inputs), out) > 45


def test_launch_shape_fills_the_sms():
    assert launch_shape(4608, 256, 132)[0] == 64  # 72 x 4 programs
    assert launch_shape(4608, 64, 132)[0] == 32  # 72 programs of 64 rows would leave 60 SMs idle
    assert launch_shape(512, 192, 132)[0] == 32


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: i.update(x_fp8=i["x_fp8"].float()), "x must be float8_e4m3fn"),
        (lambda i: i.update(a=i["a"].float()), "a must be bf16"),
        (lambda i: i.update(a=i["a"][:, :-16].contiguous()), r"a must be bf16 \[C, K=64\]"),
        (lambda i: i.update(x_scale=i["x_scale"][:-1]), "one per row"),
        (lambda i: i.update(col_scale=i["col_scale"][:-1]), "one per row / column"),
    ],
)
def test_bad_inputs_name_the_value_and_the_fix(change, message, device):
    inputs = make(8, 64, [16], 16, device)
    change(inputs)
    with pytest.raises(ValueError, match=message):
        lora_down_fwd(**inputs)


def test_no_rows():
    inputs = make(0, 32, [16], 16, "cpu")
    assert lora_down(**inputs).shape == (0, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("m, k, c", [(4096, 3072, 192), (4608, 3072, 256), (4608, 15360, 64), (512, 12288, 64)])
def test_flux_shapes_on_the_gpu(m, k, c):
    """A 1024^2 step's adapted projections: the image stream's fused QKV, linear1, linear2, the text stream's ff2."""
    inputs = make(m, k, [64] * (c // 64), 64, "cuda", seed=7)
    out = lora_down_fwd(**inputs)
    torch.testing.assert_close(out.float(), lora_down_ref(**inputs).float(), rtol=2**-7, atol=1e-4)
