"""kernels/fp8_lora_gemm.py: an fp8 projection with its LoRA updates in the epilogue, against its fp32 reference and
against the engine's path beside cuBLAS (the base, then each part's update added); its checks. On a machine without
CUDA: the Triton interpreter (small tiles, so that the shapes below span several programs and partial tiles)."""

from __future__ import annotations

import pytest
import torch

import flux_kernels
from flux_kernels.fp8 import quantize_fp8_rowwise
from flux_kernels.fp8_lora_gemm import (
    fp8_lora_gemm,
    fp8_lora_gemm_fwd,
    fp8_lora_gemm_ref,
    lora_columns,
    part_alignment,
    runs_here,
)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(flux_kernels, "POISON_OUTPUTS", True)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.float(), out.float()
    return float(20 * torch.log10(ref.norm() / (ref - out).norm()))


def make(m, k, widths, ranks, rank, device, seed=0, bias=True):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator)
    weight = torch.randn(sum(widths), k, generator=generator) * k**-0.5
    x_fp8, x_scale = quantize_fp8_rowwise(x)
    w_fp8, w_scale = quantize_fp8_rowwise(weight)
    updated = sum(1 for r in ranks if r)
    low = (torch.randn(m, updated * rank, generator=generator) * 0.3).bfloat16()
    up = torch.zeros(sum(widths), rank)
    start = 0
    for width, part_rank in zip(widths, ranks, strict=True):  # each part's B, its rows padded with zeros to `rank`
        up[start : start + width, :part_rank] = torch.randn(width, part_rank, generator=generator) * 0.1 * k**-0.5
        start += width
    inputs = {
        "x_fp8": x_fp8.to(device), "x_scale": x_scale.reshape(-1).to(device), "weight_fp8": w_fp8.to(device),
        "weight_scale": w_scale.reshape(-1).to(device),
        "bias": (torch.randn(sum(widths), generator=generator) * 0.1).bfloat16().to(device) if bias else None,
    }  # fmt: skip
    lora = {"low": low.to(device), "low_col": lora_columns(widths, ranks, rank, device), "up": up.bfloat16().to(device)}
    return inputs, lora


# (M, K, part widths, each part's rank, padded rank): a fused QKV; a part without an adapter between two with;
# linear1's unequal parts; one token; M not a multiple of the tile
CASES = [
    (40, 64, [32, 32, 32], [16, 16, 16], 16),
    (33, 96, [32, 32, 32], [16, 0, 8], 16),
    (50, 64, [32, 32, 32, 128], [16, 16, 16, 16], 16),
    (1, 32, [64], [32], 32),
]


@pytest.mark.parametrize("prefetch", [False, True], ids=["loads-after-k", "loads-before-k"])
@pytest.mark.parametrize("persistent", [False, True], ids=["tile-a-program", "persistent"])
@pytest.mark.parametrize("m, k, widths, ranks, rank", CASES)
def test_matches_the_fp32_reference(m, k, widths, ranks, rank, persistent, prefetch, device):
    inputs, lora = make(m, k, widths, ranks, rank, device)
    assert runs_here(inputs["x_fp8"])
    out = fp8_lora_gemm_fwd(**inputs, **lora, part_align=part_alignment(widths), persistent=persistent,
                            prefetch_lora=prefetch)  # fmt: skip
    reference = fp8_lora_gemm_ref(**inputs, **lora)
    # one bf16 rounding on both sides of fp32 sums taken in different orders: measured <= 1 bf16 ulp of the output
    torch.testing.assert_close(out.float(), reference.float(), rtol=2**-7, atol=1e-3)
    base = fp8_lora_gemm_fwd(**inputs)  # without the update: the columns with an adapter differ
    assert not torch.allclose(out.float(), base.float(), rtol=2**-7, atol=1e-3)


def test_each_part_takes_its_own_adapters_columns(device):
    """A part's update reads its own columns of low: with part 1's low zeroed, only part 1's columns change."""
    widths, ranks = [32, 32, 32], [16, 16, 16]
    inputs, lora = make(24, 64, widths, ranks, 16, device, seed=3)
    full = fp8_lora_gemm_fwd(**inputs, **lora, part_align=32)
    lora["low"][:, 16:32] = 0
    without_second = fp8_lora_gemm_fwd(**inputs, **lora, part_align=32)
    base = fp8_lora_gemm_fwd(**inputs)
    torch.testing.assert_close(without_second[:, 32:64], base[:, 32:64], rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(without_second[:, :32], full[:, :32], rtol=0, atol=0)
    torch.testing.assert_close(without_second[:, 64:], full[:, 64:], rtol=0, atol=0)


@pytest.mark.parametrize("persistent", [False, True], ids=["tile-a-program", "persistent"])
@pytest.mark.parametrize("prefetch", [False, True], ids=["loads-after-k", "loads-before-k"])
def test_a_part_without_an_adapter_reads_nothing_of_the_update(device, persistent, prefetch):
    """Columns whose low_col is -1 are the base alone, bit for bit: their rows of `up` (NaN here) and the other
    parts' `low` are never read (Triton's // rounds toward zero: -1 // R is 0, the first part's columns, unless the
    kernel keeps -1 negative)."""
    widths, ranks = [32, 32, 32], [16, 0, 16]
    inputs, lora = make(24, 64, widths, ranks, 16, device, seed=5)
    lora["up"][32:64] = float("nan")
    out = fp8_lora_gemm_fwd(**inputs, **lora, part_align=32, persistent=persistent, prefetch_lora=prefetch)
    base = fp8_lora_gemm_fwd(**inputs, persistent=persistent)
    assert torch.equal(out[:, 32:64], base[:, 32:64])
    assert not out.isnan().any()


def test_matches_the_engines_path_beside_cublas(device):
    """The same values as the base GEMM followed by each part's B product added (what engine.lora_update computes
    beside an fp8 base), in SQNR: both are the fp8 products plus the same bf16 update, rounded once or twice."""
    widths, ranks = [32, 32, 32, 128], [16, 16, 16, 16]
    inputs, lora = make(48, 96, widths, ranks, 16, device, seed=5)
    base = fp8_lora_gemm_fwd(**inputs)
    engine_path = base.float()
    for part, (start, width) in enumerate(zip([0, 32, 64, 96], widths, strict=True)):
        low = lora["low"][:, part * 16 : (part + 1) * 16].float()
        engine_path[:, start : start + width] += low @ lora["up"][start : start + width].float().t()
    fused = fp8_lora_gemm_fwd(**inputs, **lora, part_align=part_alignment(widths))
    # the engine's path rounds the base to bf16 before the update: two roundings against one, measured ~50 dB
    assert sqnr_db(engine_path, fused) > 40


def test_without_bias(device):
    inputs, lora = make(20, 64, [32], [16], 16, device, bias=False)
    out = fp8_lora_gemm(**inputs, **lora)
    torch.testing.assert_close(out.float(), fp8_lora_gemm_ref(**inputs, **lora).float(), rtol=2**-7, atol=1e-3)


def test_helpers():
    assert part_alignment([3072, 3072, 3072, 12288]) == 3072
    assert part_alignment([3072, 12288]) == 3072
    assert part_alignment([96, 32]) == 32
    columns = lora_columns([2, 2, 2], [4, 0, 4], 4, "cpu")
    assert columns.tolist() == [0, 0, -1, -1, 4, 4]
    with pytest.raises(ValueError, match="rank 8 in all, above the padded 4"):
        lora_columns([2], [8], 4, "cpu")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i, lo: i.update(x_fp8=i["x_fp8"].float()), "must be float8_e4m3fn"),
        (lambda i, lo: i.update(x_scale=i["x_scale"][:-1]), "one per row"),
        (lambda i, lo: lo.update(up=lo["up"][:, :12]), "a power of two >= 16"),
        (lambda i, lo: lo.update(low=lo["low"].float()), "low must be bf16"),
        (lambda i, lo: lo.update(low_col=lo["low_col"].long()), "low_col must be int32"),
    ],
)
def test_bad_inputs_name_the_value_and_the_fix(change, message, device):
    inputs, lora = make(8, 32, [32], [16], 16, device)
    change(inputs, lora)
    with pytest.raises(ValueError, match=message):
        fp8_lora_gemm_fwd(**inputs, **lora)


def test_no_config_fits_parts_narrower_than_every_tile(device):
    if not torch.cuda.is_available():
        pytest.skip("the autotuner's configs are the GPU's; the interpreter runs one small tile")
    inputs, lora = make(64, 128, [48, 80], [16, 16], 16, device)
    with pytest.raises(ValueError, match="aligned to 16 columns; the narrowest tile is 32"):
        fp8_lora_gemm_fwd(**inputs, **lora, part_align=part_alignment([48, 80]))


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", [False, True], ids=["loads-after-k", "loads-before-k"])
@pytest.mark.parametrize("persistent", [False, True], ids=["tile-a-program", "persistent"])
@pytest.mark.parametrize("fast_accum", [True, False])
def test_flux_shape_on_the_gpu_against_scaled_mm(fast_accum, persistent, prefetch):
    """A FLUX fused QKV at 1024^2's image tokens: the base as cuBLAS's _scaled_mm computes it, the update as the
    reference adds it."""
    inputs, lora = make(4096, 3072, [3072] * 3, [64] * 3, 64, "cuda", seed=7)
    out = fp8_lora_gemm_fwd(**inputs, **lora, part_align=3072, fast_accum=fast_accum, persistent=persistent,
                            prefetch_lora=prefetch)  # fmt: skip
    cublas = torch._scaled_mm(inputs["x_fp8"], inputs["weight_fp8"].t(), scale_a=inputs["x_scale"].view(-1, 1),
                              scale_b=inputs["weight_scale"].view(1, -1), bias=inputs["bias"],
                              out_dtype=torch.bfloat16, use_fast_accum=fast_accum)  # fmt: skip
    expected = cublas.float() + (fp8_lora_gemm_ref(**inputs, **lora).float() - fp8_lora_gemm_ref(**inputs).float())
    assert sqnr_db(expected, out) > 40
    assert sqnr_db(fp8_lora_gemm_ref(**inputs, **lora), out) > 40
