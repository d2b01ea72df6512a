"""kernels/layernorm_modulate.py: layernorm_modulate, gated_residual_layernorm_modulate and their fp8-output
variants against their references (house tolerance rule; the fp8 ones against quantize_fp8_rowwise of the fp32
reference), the references against diffusers' own modules, their checks, custom ops and compile.

On a machine without CUDA these run in the Triton interpreter (conftest sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch
from kernel_tolerance import assert_fp8_rows_match, assert_within_pytorch_error

import flux_kernels
from flux_kernels import layernorm_modulate as layernorm_module
from flux_kernels.fp8 import E4M3_MAX, MIN_SCALE
from flux_kernels.layernorm_modulate import (
    gated_residual_layernorm_modulate,
    gated_residual_layernorm_modulate_fp8,
    gated_residual_layernorm_modulate_fp8_ref,
    gated_residual_layernorm_modulate_ref,
    layernorm_modulate,
    layernorm_modulate_fp8,
    layernorm_modulate_fp8_ref,
    layernorm_modulate_ref,
)

DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(flux_kernels, "POISON_OUTPUTS", True)


def randn(generator, *shape, dtype, device, scale=1.0, offset=0.0):
    return (torch.randn(*shape, generator=generator) * scale + offset).to(device=device, dtype=dtype)


def make_modulation(batch, tokens, channels, dtype, device, strided=False, seed=0):
    """x (and y) [B, L, C] plus shift, scale, gate as FLUX makes them: chunks of one [B, 6C] adaLN output."""
    generator = torch.Generator().manual_seed(seed + tokens)
    width = channels + 48 if strided else channels
    x = randn(generator, batch, tokens, width, dtype=dtype, device=device, scale=2.0, offset=0.5)[..., :channels]
    y = randn(generator, batch, tokens, width, dtype=dtype, device=device)[..., :channels]
    embedding = randn(generator, batch, 6 * channels, dtype=dtype, device=device, scale=0.5)
    shift, scale, gate, *_ = embedding.chunk(6, dim=1)
    return x, y, gate, shift, scale


LAYERNORM_SHAPES = [(1, 1, 64), (2, 77, 3072), (1, 300, 96), (2, 129, 1000)]


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, tokens, channels", LAYERNORM_SHAPES)
def test_layernorm_modulate_matches_reference(batch, tokens, channels, dtype, strided, device):
    x, _, _, shift, scale = make_modulation(batch, tokens, channels, dtype, device, strided)
    out = layernorm_modulate(x, shift, scale)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert_within_pytorch_error(
        out, layernorm_modulate_ref(x, shift, scale), layernorm_modulate_ref(x, shift, scale, upcast=False)
    )


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, tokens, channels", LAYERNORM_SHAPES)
def test_gated_residual_layernorm_modulate_matches_reference(batch, tokens, channels, dtype, strided, device):
    x, y, gate, shift, scale = make_modulation(batch, tokens, channels, dtype, device, strided)
    residual, normed = gated_residual_layernorm_modulate(x, y, gate, shift, scale)
    residual_fp32, normed_fp32 = gated_residual_layernorm_modulate_ref(x, y, gate, shift, scale)
    residual_same, normed_same = gated_residual_layernorm_modulate_ref(x, y, gate, shift, scale, upcast=False)
    for out in (residual, normed):
        assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert_within_pytorch_error(residual, residual_fp32, residual_same, name="residual")
    assert_within_pytorch_error(normed, normed_fp32, normed_same, name="normed")


def test_layernorm_ref_is_diffusers_norm2(device):
    """layernorm_modulate_ref(upcast=False) is FluxTransformerBlock's norm2 + modulation, bit for bit."""
    x, _, _, shift, scale = make_modulation(2, 5, 64, torch.bfloat16, device)
    norm2 = torch.nn.LayerNorm(64, elementwise_affine=False, eps=1e-6)
    expected = norm2(x) * (1 + scale[:, None]) + shift[:, None]
    assert torch.equal(layernorm_modulate_ref(x, shift, scale, upcast=False), expected)


@pytest.mark.parametrize(
    "op, args, message",
    [
        ("ln", dict(shift=lambda s: s[:1]), r"shift has shape \(1, 64\); expected \[B, C\] = \[2, 64\]"),
        ("ln", dict(x=lambda x: x[0]), r"x has shape \(5, 64\); expected 3 dims"),
        ("ln", dict(x=lambda x: x.transpose(1, 2).contiguous().transpose(1, 2)), r"x has stride 5 in its last dim"),
        ("ln", dict(x=lambda x: x.int()), r"x has dtype torch.int32"),
        ("gated", dict(y=lambda y: y[:, :4]), r"y is \(2, 4, 64\) .* but x is \(2, 5, 64\)"),
        ("gated", dict(gate=lambda g: g[:, :10]), r"gate has shape \(2, 10\)"),
    ],
    ids=["shift_batch", "x_2d", "x_last_stride", "x_int", "y_shape", "gate_shape"],
)
def test_layernorm_bad_inputs(op, args, message, device):
    x, y, gate, shift, scale = make_modulation(2, 5, 64, torch.bfloat16, device)
    tensors = dict(x=x, y=y, gate=gate, shift=shift, scale=scale)
    for key, change in args.items():
        tensors[key] = change(tensors[key])
    with pytest.raises(ValueError, match=message):
        if op == "ln":
            layernorm_modulate(tensors["x"], tensors["shift"], tensors["scale"])
        else:
            gated_residual_layernorm_modulate(**tensors)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [4608, 16896])
def test_layernorm_ops_flux_shapes(tokens, device):
    x, y, gate, shift, scale = make_modulation(1, tokens, 3072, torch.bfloat16, device)
    out = layernorm_modulate(x, shift, scale)
    assert_within_pytorch_error(
        out, layernorm_modulate_ref(x, shift, scale), layernorm_modulate_ref(x, shift, scale, upcast=False)
    )
    residual, normed = gated_residual_layernorm_modulate(x, y, gate, shift, scale)
    references_fp32 = gated_residual_layernorm_modulate_ref(x, y, gate, shift, scale)
    references_same = gated_residual_layernorm_modulate_ref(x, y, gate, shift, scale, upcast=False)
    for out, ref32, ref in zip((residual, normed), references_fp32, references_same, strict=True):
        assert_within_pytorch_error(out, ref32, ref)


# ----------------------------------------------------------------------------- fp8 outputs


FP8_SHAPES = [(1, 1, 64), (2, 77, 3072), (2, 129, 1000)]


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, tokens, channels", FP8_SHAPES)
def test_layernorm_modulate_fp8_matches_quantized_reference(batch, tokens, channels, dtype, strided, device):
    x, _, _, shift, scale = make_modulation(batch, tokens, channels, dtype, device, strided)
    q, q_scale = layernorm_modulate_fp8(x, shift, scale)
    assert_fp8_rows_match(q, q_scale, *layernorm_modulate_fp8_ref(x, shift, scale), x.shape)


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("batch, tokens, channels", FP8_SHAPES)
def test_gated_residual_layernorm_modulate_fp8_matches_quantized_reference(batch, tokens, channels, strided, device):
    x, y, gate, shift, scale = make_modulation(batch, tokens, channels, torch.bfloat16, device, strided)
    residual, q, q_scale = gated_residual_layernorm_modulate_fp8(x, y, gate, shift, scale)
    ref_residual, ref_q, ref_scale = gated_residual_layernorm_modulate_fp8_ref(x, y, gate, shift, scale)
    assert residual.dtype == x.dtype and residual.shape == x.shape
    # the residual is the same one the bf16 op writes
    residual_bf16, _ = gated_residual_layernorm_modulate(x, y, gate, shift, scale)
    assert torch.equal(residual, residual_bf16)
    assert_within_pytorch_error(
        residual, ref_residual, gated_residual_layernorm_modulate_ref(x, y, gate, shift, scale, upcast=False)[0]
    )
    assert_fp8_rows_match(q, q_scale, ref_q, ref_scale, x.shape)


def test_fp8_outputs_of_zero_and_tiny_rows(device):
    """With (1 + scale) = 0 the output is the shift: all zero in batch 0, which quantises to zeros with the floor
    scale (no 0/0), and ~1e-30 in 8 columns of batch 1, which keep full e4m3 precision (the scale follows them)."""
    x, _, _, shift, scale = make_modulation(2, 3, 64, torch.float32, device)
    scale = torch.full_like(scale, -1.0)
    shift = torch.zeros_like(shift)
    shift[1, :8] = torch.linspace(1e-30, 8e-30, 8)
    q, q_scale = layernorm_modulate_fp8(x, shift, scale)
    ref_q, ref_scale = layernorm_modulate_fp8_ref(x, shift, scale)
    assert (q[0].float() == 0).all() and (q_scale[0] == MIN_SCALE).all()
    assert (q[1, :, :8].float().abs().amax(dim=-1) == E4M3_MAX).all() and (q[1, :, 8:].float() == 0).all()
    assert torch.equal(q.float(), ref_q.float())
    torch.testing.assert_close(q_scale, ref_scale, rtol=1e-5, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [4608, 16896])
def test_fp8_layernorm_ops_flux_shapes(tokens, device):
    x, y, gate, shift, scale = make_modulation(1, tokens, 3072, torch.bfloat16, device)
    assert_fp8_rows_match(
        *layernorm_modulate_fp8(x, shift, scale), *layernorm_modulate_fp8_ref(x, shift, scale), x.shape
    )
    residual, q, q_scale = gated_residual_layernorm_modulate_fp8(x, y, gate, shift, scale)
    _, ref_q, ref_scale = gated_residual_layernorm_modulate_fp8_ref(x, y, gate, shift, scale)
    assert torch.equal(residual, gated_residual_layernorm_modulate(x, y, gate, shift, scale)[0])
    assert_fp8_rows_match(q, q_scale, ref_q, ref_scale, x.shape)


# ----------------------------------------------------------------------------- custom ops / torch.compile


def test_custom_ops_registration(device):
    x, y, gate, shift, scale = make_modulation(2, 7, 64, torch.bfloat16, device, strided=True)
    torch.library.opcheck(torch.ops.flux_kernels.layernorm_modulate.default, (x, shift, scale))
    torch.library.opcheck(torch.ops.flux_kernels.gated_residual_layernorm_modulate.default, (x, y, gate, shift, scale))
    torch.library.opcheck(torch.ops.flux_kernels.layernorm_modulate_fp8.default, (x, shift, scale))
    torch.library.opcheck(
        torch.ops.flux_kernels.gated_residual_layernorm_modulate_fp8.default, (x, y, gate, shift, scale)
    )


def test_eager_calls_skip_the_custom_ops(monkeypatch, device):
    # the op dispatch costs ~10-20 us a call: eagerly, the public functions must launch directly
    def refuse(*args, **kwargs):
        raise AssertionError("an eager call went through the custom op")

    for name in (
        "_layernorm_modulate_op", "_gated_residual_layernorm_modulate_op",
        "_layernorm_modulate_fp8_op", "_gated_residual_layernorm_modulate_fp8_op",
    ):  # fmt: skip
        monkeypatch.setattr(layernorm_module, name, refuse)
    x, y, gate, shift, scale = make_modulation(1, 3, 64, torch.bfloat16, device)
    assert_within_pytorch_error(
        layernorm_modulate(x, shift, scale),
        layernorm_modulate_ref(x, shift, scale),
        layernorm_modulate_ref(x, shift, scale, upcast=False),
    )
    residual, _ = gated_residual_layernorm_modulate(x, y, gate, shift, scale)
    residual_fp32, _ = gated_residual_layernorm_modulate_ref(x, y, gate, shift, scale)
    residual_same, _ = gated_residual_layernorm_modulate_ref(x, y, gate, shift, scale, upcast=False)
    assert_within_pytorch_error(residual, residual_fp32, residual_same, name="residual")
    assert_fp8_rows_match(
        *layernorm_modulate_fp8(x, shift, scale), *layernorm_modulate_fp8_ref(x, shift, scale), x.shape
    )
    assert torch.equal(gated_residual_layernorm_modulate_fp8(x, y, gate, shift, scale)[0], residual)


def test_compiles_fullgraph_without_breaks(device):
    torch._dynamo.reset()

    def block(x, y, embedding):
        shift, scale, gate, *_ = embedding.chunk(6, dim=1)
        residual, normed = gated_residual_layernorm_modulate(x, y, gate, shift, scale)
        modulated = layernorm_modulate(residual, shift, scale)
        _, normed_fp8, normed_scale = gated_residual_layernorm_modulate_fp8(x, y, gate, shift, scale)
        modulated_fp8, modulated_scale = layernorm_modulate_fp8(residual, shift, scale)
        dequantized = normed_fp8.float() * normed_scale + modulated_fp8.float() * modulated_scale
        return residual, normed + modulated, dequantized

    x, y, *_ = make_modulation(1, 5, 64, torch.bfloat16, device)
    embedding = torch.randn(1, 6 * 64, generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    for got, want in zip(compiled(x, y, embedding), block(x, y, embedding), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
