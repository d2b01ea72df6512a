"""kernels/qk_norm_rope.py: qk_norm_rope against its reference (house tolerance rule), the reference against
diffusers' own modules, its checks, its custom op and its compile.

On a machine without CUDA these run in the Triton interpreter (conftest sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_flux import FluxPosEmbed
from kernel_tolerance import assert_within_pytorch_error

import flux_kernels
from flux_kernels import qk_norm_rope as qk_module
from flux_kernels.qk_norm_rope import pack_heads, qk_norm_rope, qk_norm_rope_grouped, qk_norm_rope_ref

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


# ----------------------------------------------------------------------------- the grouped layout (Ulysses)


@pytest.mark.parametrize(
    "heads, groups, slices",
    [(4, 1, 1), (4, 2, 1), (4, 2, 2), (4, 4, 1), (6, 3, 2), (6, 1, 3)],
)
@pytest.mark.parametrize("text_tokens", [0, 7])
def test_qk_norm_rope_grouped_stores_are_the_default_outputs_moved(heads, groups, slices, text_tokens, device):
    """Each value lands where pack_heads puts the default layout's: bit for bit (the same arithmetic, other
    addresses), every element written (outputs are poisoned)."""
    inputs = make_qk_norm_rope_inputs(2, text_tokens, 9, heads, 64, torch.bfloat16, device, strided=True)
    packed = qk_norm_rope_grouped(**inputs, groups=groups, slices=slices)
    per_slice = heads // (groups * slices)
    assert packed.shape == (slices, groups, text_tokens + 9, 3, 2, per_slice, 64) and packed.is_contiguous()
    assert torch.equal(packed, pack_heads(*qk_norm_rope(**inputs), groups, slices))


@pytest.mark.gpu
@pytest.mark.parametrize("groups, slices", [(2, 2), (4, 1)])
def test_qk_norm_rope_grouped_at_flux_shapes(groups, slices, device):
    """The compiled kernel (not the interpreter) with the runtime's stride specialisations, at 2048^2's share of one
    rank on two GPUs: the same bits as the default layout moved."""
    inputs = make_qk_norm_rope_inputs(1, 256, 8192, 24, 128, torch.bfloat16, device)
    packed = qk_norm_rope_grouped(**inputs, groups=groups, slices=slices)
    assert torch.equal(packed, pack_heads(*qk_norm_rope(**inputs), groups, slices))


def test_pack_heads_puts_each_head_of_a_group_slice_together():
    """pack_heads' layout, spelled out on labelled values: slice s of group g holds heads (g * C + s) * H'' + i."""
    batch, heads, tokens, head_dim, groups, slices = 2, 8, 3, 1, 2, 2
    label = torch.arange(batch * heads * tokens, dtype=torch.float32).reshape(batch, heads, tokens, head_dim)
    packed = pack_heads(label, label + 1000, label + 2000, groups, slices)  # [C, G, L, 3, B, H'', D]
    per_slice = heads // (groups * slices)
    for s, g, t, part, b, i in torch.cartesian_prod(*(torch.arange(n) for n in packed.shape[:6])).tolist():
        head = (g * slices + s) * per_slice + i
        assert packed[s, g, t, part, b, i, 0] == label[b, head, t, 0] + 1000 * part


@pytest.mark.parametrize("groups, slices", [(5, 1), (2, 3), (0, 1)])
def test_qk_norm_rope_grouped_refuses_groups_that_do_not_divide_the_heads(groups, slices, device):
    inputs = make_qk_norm_rope_inputs(1, 2, 8, 4, 64, torch.bfloat16, device)
    with pytest.raises(ValueError, match=rf"4 heads do not split into {groups} groups of {slices} equal slices"):
        qk_norm_rope_grouped(**inputs, groups=groups, slices=slices)


def test_grouped_custom_op_registration(device):
    inputs = make_qk_norm_rope_inputs(1, 3, 5, 4, 64, torch.bfloat16, device, strided=True)
    args = [inputs[name] for name in ("qkv", "q_weight", "k_weight", "cos", "sin", "heads")]
    args += [1e-6, inputs["txt_qkv"], inputs["txt_q_weight"], inputs["txt_k_weight"], 2, 2]
    torch.library.opcheck(torch.ops.flux_kernels.qk_norm_rope_grouped.default, args)


# ----------------------------------------------------------------------------- custom op / torch.compile


def test_custom_op_registration(device):
    inputs = make_qk_norm_rope_inputs(1, 3, 5, 2, 64, torch.bfloat16, device, strided=True)
    torch.library.opcheck(torch.ops.flux_kernels.qk_norm_rope.default, (), inputs)


def test_eager_calls_skip_the_custom_op(monkeypatch, device):
    # the op dispatch costs ~10-20 us a call: eagerly, the public function must launch directly
    def refuse(*args, **kwargs):
        raise AssertionError("an eager call went through the custom op")

    monkeypatch.setattr(qk_module, "_qk_norm_rope_op", refuse)
    check_qk_norm_rope(make_qk_norm_rope_inputs(1, 2, 3, 2, 64, torch.bfloat16, device))


def test_compiles_fullgraph_without_breaks(device):
    torch._dynamo.reset()

    def attention_inputs(txt_qkv, qkv, q_weight, k_weight, cos, sin):
        # the three outputs as they are: a sum would be fused and rounded once by inductor (three times eagerly)
        return qk_norm_rope(qkv, q_weight, k_weight, cos, sin, 2, 1e-6, txt_qkv, q_weight, k_weight)

    qk_inputs = make_qk_norm_rope_inputs(1, 3, 6, 2, 64, torch.bfloat16, device)
    args = [qk_inputs[name] for name in ("txt_qkv", "qkv", "q_weight", "k_weight", "cos", "sin")]
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    compiled = torch.compile(attention_inputs, fullgraph=True, backend=backend)
    for got, expected in zip(compiled(*args), attention_inputs(*args), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
