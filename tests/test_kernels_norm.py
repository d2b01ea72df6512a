"""kernels/norm.py: qk_norm_rope, layernorm_modulate, gated_residual_layernorm_modulate against their
references (house tolerance rule), and the references against diffusers' own modules.

On a machine without CUDA these run in the Triton interpreter (conftest sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_flux import FluxPosEmbed
from kernel_tolerance import assert_fp8_rows_match, assert_within_pytorch_error

import flux_kernels
from flux_kernels import norm as norm_module
from flux_kernels.fp8 import E4M3_MAX, MIN_SCALE
from flux_kernels.norm import (
    gated_residual_layernorm_modulate,
    gated_residual_layernorm_modulate_fp8,
    gated_residual_layernorm_modulate_fp8_ref,
    gated_residual_layernorm_modulate_ref,
    layernorm_modulate,
    layernorm_modulate_fp8,
    layernorm_modulate_fp8_ref,
    layernorm_modulate_ref,
    qk_norm_rope,
    qk_norm_rope_ref,
)

DTYPES = [torch.bfloat16, torch.float16]
AXES_DIM = {128: [16, 56, 56], 64: [8, 28, 28]}  # FLUX's split of head_dim over (index, row, col) ids


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(flux_kernels, "POISON_OUTPUTS", True)


def randn(generator, *shape, dtype, device, scale=1.0, offset=0.0):
    return (torch.randn(*shape, generator=generator) * scale + offset).to(device=device, dtype=dtype)


def flux_rotary(text_tokens: int, image_tokens: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L_txt + L_img, D] exactly as FLUX makes them: zero ids for text, (0, row, col) for image."""
    width = max(1, int(image_tokens**0.5))
    index = torch.arange(image_tokens)
    image_ids = torch.stack([torch.zeros(image_tokens), (index // width).float(), (index % width).float()], dim=-1)
    ids = torch.cat([torch.zeros(text_tokens, 3), image_ids])
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=AXES_DIM[head_dim])(ids)
    return cos.to(device), sin.to(device)


def fused_projection(generator, batch, tokens, width, dtype, device, strided):
    """A [B, L, width] fused-QKV output; strided: a view whose token stride is not `width` (a slice)."""
    if not strided:
        return randn(generator, batch, tokens, width, dtype=dtype, device=device)
    return randn(generator, batch, tokens, width + 64, dtype=dtype, device=device)[..., 32 : 32 + width]


def make_qk_norm_rope_inputs(batch, text_tokens, image_tokens, heads, head_dim, dtype, device, strided=False):
    generator = torch.Generator().manual_seed(text_tokens * 1000 + image_tokens)
    width = 3 * heads * head_dim
    qkv = fused_projection(generator, batch, image_tokens, width, dtype, device, strided)
    weights = [randn(generator, head_dim, dtype=dtype, device=device, scale=0.3, offset=1.0) for _ in range(4)]
    cos, sin = flux_rotary(text_tokens, image_tokens, head_dim, device)
    inputs = dict(qkv=qkv, q_weight=weights[0], k_weight=weights[1], cos=cos, sin=sin, heads=heads)
    if text_tokens:
        txt_qkv = fused_projection(generator, batch, text_tokens, width, dtype, device, strided)
        inputs.update(txt_qkv=txt_qkv, txt_q_weight=weights[2], txt_k_weight=weights[3])
    return inputs


def check_qk_norm_rope(inputs):
    outputs = qk_norm_rope(**inputs)
    references_fp32 = qk_norm_rope_ref(**inputs, upcast=True)
    references_same = qk_norm_rope_ref(**inputs, upcast=False)
    batch, heads = inputs["qkv"].shape[0], inputs["heads"]
    tokens = inputs["cos"].shape[0]
    head_dim = inputs["cos"].shape[1]
    for name, out, ref32, ref in zip("qkv", outputs, references_fp32, references_same, strict=True):
        assert (
            out.shape == (batch, heads, tokens, head_dim) and out.is_contiguous() and out.dtype == inputs["qkv"].dtype
        )
        assert_within_pytorch_error(out, ref32, ref, name=name)
    # v is a copy: exact
    torch.testing.assert_close(outputs[2], references_same[2], rtol=0, atol=0)


# ----------------------------------------------------------------------------- qk_norm_rope


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "batch, text_tokens, image_tokens, heads, head_dim",
    [
        (1, 0, 1, 1, 64),  # image only, one token
        (2, 77, 129, 2, 128),  # text + image, the double-stream layout
        (1, 1, 300, 1, 64),
        (2, 0, 257, 3, 128),  # image only (single-stream blocks get one joint qkv)
        (1, 7, 1, 3, 64),
    ],
)
def test_qk_norm_rope_matches_reference(batch, text_tokens, image_tokens, heads, head_dim, dtype, device):
    check_qk_norm_rope(make_qk_norm_rope_inputs(batch, text_tokens, image_tokens, heads, head_dim, dtype, device))


@pytest.mark.parametrize("text_tokens", [0, 13])
def test_qk_norm_rope_strided_inputs(text_tokens, device):
    check_qk_norm_rope(make_qk_norm_rope_inputs(2, text_tokens, 77, 2, 64, torch.bfloat16, device, strided=True))


def test_qk_norm_rope_ref_is_diffusers(device):
    """upcast=False reproduces diffusers' FluxAttnProcessor steps bit for bit."""
    inputs = make_qk_norm_rope_inputs(2, 5, 9, 2, 64, torch.bfloat16, device)
    heads, head_dim = inputs["heads"], 64

    def diffusers_norm(weight):
        norm = RMSNorm(head_dim, eps=1e-6).to(device=device, dtype=weight.dtype)
        norm.weight.data.copy_(weight)
        return norm

    def project(stream, norm_q, norm_k):
        query, key, value = stream.chunk(3, dim=-1)
        query, key, value = (x.unflatten(-1, (-1, head_dim)) for x in (query, key, value))
        return norm_q(query), norm_k(key), value

    query, key, value = project(inputs["qkv"], diffusers_norm(inputs["q_weight"]), diffusers_norm(inputs["k_weight"]))
    txt = project(inputs["txt_qkv"], diffusers_norm(inputs["txt_q_weight"]), diffusers_norm(inputs["txt_k_weight"]))
    query, key, value = (torch.cat([t, x], dim=1) for t, x in zip(txt, (query, key, value), strict=True))
    rotary = (inputs["cos"], inputs["sin"])
    query = apply_rotary_emb(query, rotary, sequence_dim=1)
    key = apply_rotary_emb(key, rotary, sequence_dim=1)
    expected = [x.transpose(1, 2) for x in (query, key, value)]
    assert heads == query.shape[2]
    for got, want in zip(qk_norm_rope_ref(**inputs, upcast=False), expected, strict=True):
        assert torch.equal(got, want)


def _strided_last_dim(x):
    return torch.repeat_interleave(x, 2, dim=-1)[..., ::2]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: i.update(heads=5), r"last dim 384 is not 3 \* heads \* head_dim for heads=5"),
        (lambda i: i.update(qkv=i["qkv"][..., :288], heads=2), r"head_dim 48 is not a power of two"),
        (lambda i: i.update(cos=i["cos"][:8]), r"cos has shape \(8, 64\); expected \[L_txt \+ L_img, head_dim\]"),
        (lambda i: i.update(txt_k_weight=None), r"txt_qkv needs txt_q_weight and txt_k_weight"),
        (lambda i: i.update(q_weight=i["q_weight"].repeat(2)), r"q_weight has shape \(128,\).*\[64\]"),
        (lambda i: i.update(k_weight=i["k_weight"].float()), r"one dtype"),
        (lambda i: i.update(qkv=i["qkv"].double()), r"qkv has dtype torch.float64"),
        (lambda i: i.update(qkv=_strided_last_dim(i["qkv"])), r"qkv has stride 2 in its last dim"),
        (lambda i: i.update(txt_qkv=i["txt_qkv"][:, :, :192]), r"batch and last dim must match"),
    ],
    ids=["heads", "head_dim", "cos_rows", "txt_weight", "weight_shape", "weight_dtype", "dtype", "stride", "txt"],
)
def test_qk_norm_rope_bad_inputs(change, message, device):
    inputs = make_qk_norm_rope_inputs(1, 2, 8, 2, 64, torch.bfloat16, device)
    change(inputs)
    with pytest.raises(ValueError, match=message):
        qk_norm_rope(**inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("text_tokens, image_tokens", [(512, 4096), (0, 4608)], ids=["double", "single"])
def test_qk_norm_rope_flux_shapes(text_tokens, image_tokens, device):
    check_qk_norm_rope(make_qk_norm_rope_inputs(1, text_tokens, image_tokens, 24, 128, torch.bfloat16, device))


# ----------------------------------------------------------------------------- layernorm_modulate ops


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
    inputs = make_qk_norm_rope_inputs(1, 3, 5, 2, 64, torch.bfloat16, device, strided=True)
    torch.library.opcheck(torch.ops.flux_kernels.qk_norm_rope.default, (), inputs)
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
        "_qk_norm_rope_op", "_layernorm_modulate_op", "_gated_residual_layernorm_modulate_op",
        "_layernorm_modulate_fp8_op", "_gated_residual_layernorm_modulate_fp8_op",
    ):  # fmt: skip
        monkeypatch.setattr(norm_module, name, refuse)
    check_qk_norm_rope(make_qk_norm_rope_inputs(1, 2, 3, 2, 64, torch.bfloat16, device))
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

    def block(x, y, embedding, txt_qkv, qkv, q_weight, k_weight, cos, sin):
        shift, scale, gate, *_ = embedding.chunk(6, dim=1)
        residual, normed = gated_residual_layernorm_modulate(x, y, gate, shift, scale)
        modulated = layernorm_modulate(residual, shift, scale)
        q, k, v = qk_norm_rope(qkv, q_weight, k_weight, cos, sin, 2, 1e-6, txt_qkv, q_weight, k_weight)
        _, normed_fp8, normed_scale = gated_residual_layernorm_modulate_fp8(x, y, gate, shift, scale)
        modulated_fp8, modulated_scale = layernorm_modulate_fp8(residual, shift, scale)
        dequantized = normed_fp8.float() * normed_scale + modulated_fp8.float() * modulated_scale
        return residual, normed + modulated, q + k + v, dequantized

    qk_inputs = make_qk_norm_rope_inputs(1, 3, 6, 2, 64, torch.bfloat16, device)
    x, y, *_ = make_modulation(1, 5, 64, torch.bfloat16, device)
    embedding = torch.randn(1, 6 * 64, generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
    args = (
        x, y, embedding, qk_inputs["txt_qkv"], qk_inputs["qkv"], qk_inputs["q_weight"], qk_inputs["k_weight"],
        qk_inputs["cos"], qk_inputs["sin"],
    )  # fmt: skip
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    for got, want in zip(compiled(*args), block(*args), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
