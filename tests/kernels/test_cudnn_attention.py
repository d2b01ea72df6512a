"""cuDNN's fp8 attention (kernels/cudnn_attention.py): the static q/k scales' bound, the quantisers, the refusal where
it cannot run, the engine's wiring of the 'cudnn-fp8' core on the CPU (the cuDNN call replaced by its PyTorch
emulation, cudnn_fp8_attention_ref), and on a GPU the cuDNN kernel itself against that emulation and bf16 SDPA."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_call_kwargs
from diffusers import FluxPipeline

from benchmarks.kernels.attention_inputs import REGIMES, flux_like_qkv, per_head_cosine
from engine import EngineConfig, FluxEngine
from engine.config import AttentionConfig
from engine.errors import ConfigError
from engine.measure import psnr
from flux_kernels import cudnn_attention as ca
from flux_kernels.qk_norm_rope import qk_norm_rope_ref

CUDNN = EngineConfig(attention=AttentionConfig(backend="cudnn-fp8", fused_norms=False))


def test_qk_bound_holds_and_is_reached_by_one_hot_heads():
    """The static scale's bound: no normalised, rotated element exceeds it, and a head whose energy sits in one
    channel (the worst case) comes within 2% of it; so the bound is neither broken nor loose."""
    torch.manual_seed(0)
    heads, head_dim, tokens = 2, 64, 40
    qkv = torch.randn(1, tokens, 3 * heads * head_dim) * torch.logspace(-2, 2, tokens)[None, :, None]
    qkv[0, :8] = 0
    qkv[0, :8, 5] = 3.0  # q of head 0 of the first 8 tokens: one channel
    weight = torch.rand(head_dim) * 2 + 0.1
    weight[5] = 7.5  # the largest weight on that channel
    angles = torch.rand(tokens, head_dim // 2).repeat_interleave(2, dim=-1) * 6.3
    q, _, _ = qk_norm_rope_ref(qkv, weight, torch.ones(head_dim), angles.cos(), angles.sin(), heads, 1e-6)
    bound = ca.qk_bound(head_dim, weight, torch.ones(head_dim))
    largest = q.abs().amax()
    assert largest <= bound
    assert largest >= 0.98 * bound


def test_quantize_bounded_keeps_e4m3_precision_and_saturates():
    x = torch.tensor([0.5, -3.0, 100.0, 0.05, 250.0, -260.0])  # within e4m3's normal range (> bound / 448 / 64)
    codes, descale = ca.quantize_bounded(x, torch.tensor(200.0))
    back = codes.float() * descale.flatten()
    inside = x.abs() <= 200
    assert torch.all((back[inside] - x[inside]).abs() <= x[inside].abs() * 2**-4)  # e4m3: 3 mantissa bits
    assert back[4] == 200 and back[5] == -200 and torch.isfinite(back).all()  # past the bound: saturated


@pytest.mark.parametrize("heads", [3, 6, 5], ids=["thirds_of_1", "thirds_of_2", "one_masked_block"])
def test_qk_norm_rope_e4m3_matches_its_reference(heads, device):
    """The QK-norm kernel's e4m3 outputs (static scales computed in the kernel from the weights) against the
    reference: the bf16-free fp32 values quantised by quantize_bounded with qk_bound's scale. Heads that split
    into three power-of-two blocks (FLUX's 24 = 3 x 8) are read so, other counts as one masked block."""
    generator = torch.Generator().manual_seed(0)
    head_dim, text, image = 64, 5, 12

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, torch.bfloat16)

    qkv, txt = randn(1, image, 3 * heads * head_dim), randn(1, text, 3 * heads * head_dim)
    weights = [(torch.rand(head_dim, generator=generator) * (i + 1) + 0.5).to(device, torch.bfloat16)
               for i in range(4)]  # fmt: skip
    cos, sin = (torch.randn(text + image, head_dim, generator=generator).to(device) for _ in range(2))
    args = (qkv, weights[0], weights[1], cos, sin, heads, 1e-6, txt, weights[2], weights[3])
    (q8, q_descale), (k8, k_descale), v = ca.qk_norm_rope_e4m3_pairs(*args)
    q, k, v_ref = qk_norm_rope_ref(*args, upcast=True)
    for got, descale, x, w, tw in ((q8, q_descale, q, weights[0], weights[2]), (k8, k_descale, k, weights[1],
                                                                               weights[3])):  # fmt: skip
        want, want_descale = ca.quantize_bounded(x, ca.qk_bound(head_dim, w, tw))
        assert got.dtype == ca.FP8 and descale.shape == (1, 1, 1, 1)
        torch.testing.assert_close(descale.cpu(), want_descale.cpu(), rtol=1e-6, atol=0)
        got_values, want_values = got.float().cpu(), want.float().cpu()
        # fp32 norm + rotary in another order than PyTorch's: a value may sit on a rounding boundary (one code off)
        assert (got_values - want_values).abs().le(want_values.abs() * 2**-3 + 2**-9).all()
        assert (got_values == want_values).float().mean() > 0.99
    torch.testing.assert_close(v.float(), v_ref.to(v.dtype).float(), rtol=0, atol=0)
    # the custom op's fake (what torch.compile traces with) describes the same outputs
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = torch.ops.flux_kernels.qk_norm_rope_e4m3(*args)
    for got, want in zip(fake, (q8, q_descale, k8, k_descale, v), strict=True):
        assert (got.shape, got.dtype, got.stride()) == (want.shape, want.dtype, want.stride())


def test_emulation_matches_exact_attention_within_e4m3():
    q, k, v = flux_like_qkv(16, 48, 2, 64, "offsets", device="cpu")
    q8, qd = ca.quantize_tensor(q)
    k8, kd = ca.quantize_tensor(k)
    v8, vs = ca.quantize_v_channels(v)
    out = ca.cudnn_fp8_attention_ref(q8, k8, v8, qd, kd).float() * vs
    exact = torch.softmax(q.float() @ k.float().transpose(-1, -2) / 8, -1) @ v.float()
    assert per_head_cosine(out, exact).min() > 0.995
    # the custom op's fake: e4m3 [B, H, Lq, D] over [B, Lq, H, D] memory, as cudnn_fp8_attention_quantized returns
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = torch.ops.flux_kernels.cudnn_fp8_attention(q8, k8, v8, qd, kd)
    assert fake.shape == q.shape and fake.dtype == ca.FP8 and fake.transpose(1, 2).is_contiguous()


def test_refused_without_a_gpu_or_the_package(monkeypatch, device):
    """On a CPU model: refused before any block is touched, saying why and what to use instead. Without the
    cudnn-frontend package: the reason names the pip pin."""
    if device.type == "cpu":
        from engine.models import synthetic_components

        pipe = FluxPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.bfloat16, seed=0))
        with pytest.raises(ConfigError, match="'cudnn-fp8' cannot run here: the model is on cpu.*backend 'auto'"):
            FluxEngine.from_pipe(pipe, CUDNN)
        assert pipe.transformer.transformer_blocks[0].__class__.__name__ == "FluxTransformerBlock"
    import builtins

    real_import = builtins.__import__

    def no_cudnn(name, *args, **kwargs):
        if name == "cudnn":
            raise ImportError("No module named 'cudnn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cudnn)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    ca._cuda_unavailable_reason.cache_clear()
    try:
        assert ca.FRONTEND_PIN in ca._cuda_unavailable_reason(0)
    finally:
        ca._cuda_unavailable_reason.cache_clear()


@pytest.mark.parametrize("fused_norms", [True, False])
def test_engine_wiring_on_cpu_with_the_emulated_core(fused_norms, monkeypatch, device):
    """The 'cudnn-fp8' core in the engine's blocks on the tiny model, with the cuDNN call replaced by its PyTorch
    emulation (the kernel itself is tested on a GPU below): the static q/k scales, V's channel scales and the output
    multiply make an image near diffusers', and not the bf16 core's."""
    from engine.models import synthetic_components

    def components():
        return synthetic_components("tiny", device=device, dtype=torch.bfloat16, seed=0)

    def emulated(q8, k8, v8, q_descale, k_descale, softmax_scale=None):
        out = ca.cudnn_fp8_attention_ref(q8, k8, v8, q_descale, k_descale, softmax_scale)
        return out.transpose(1, 2).contiguous().transpose(1, 2)  # cuDNN's [B, Lq, H, D] memory

    monkeypatch.setattr(ca, "_cudnn_fp8_attention_op", emulated)
    monkeypatch.setattr("engine.attention._cudnn_fp8_unavailable", lambda device: None)
    baseline = FluxPipeline(**components())(**tiny_call_kwargs()).images.float()
    config = EngineConfig(attention=AttentionConfig(backend="cudnn-fp8", fused_norms=fused_norms))
    engine = FluxEngine.from_pipe(FluxPipeline(**components()), config)
    assert engine.attention_ops.core == "cudnn-fp8"
    images = engine(**tiny_call_kwargs()).images.float()
    bf16 = FluxEngine.from_pipe(FluxPipeline(**components()), EngineConfig(attention=AttentionConfig("sdpa", False)))
    assert not torch.equal(images, bf16(**tiny_call_kwargs()).images.float())
    # measured 48.8 dB (2026-11-30, CPU): the tiny random model's attention is near uniform, which e4m3 keeps well
    assert psnr(images, baseline) > 35.0


def test_single_blocks_hand_the_cores_e4m3_output_to_the_gelu_kernel_unscaled(monkeypatch, device):
    """Fused norms and fp8 projections: the single-stream blocks pass cuDNN's e4m3 output and V's channel scales to
    gelu_concat_fp8 (prefix_scale), which applies them as it reads, instead of a pass that writes the scaled bf16
    output first; the image is the one the unfused order makes (bit for bit on a GPU)."""
    from engine.block_ops import BlockOps
    from engine.config import QuantConfig
    from engine.models import synthetic_components
    from flux_kernels import gelu_fp8

    def emulated(q8, k8, v8, q_descale, k_descale, softmax_scale=None):
        out = ca.cudnn_fp8_attention_ref(q8, k8, v8, q_descale, k_descale, softmax_scale)
        return out.transpose(1, 2).contiguous().transpose(1, 2)  # cuDNN's [B, Lq, H, D] memory

    monkeypatch.setattr(ca, "_cudnn_fp8_attention_op", emulated)
    monkeypatch.setattr("engine.attention._cudnn_fp8_unavailable", lambda device: None)
    scaled_calls = []
    launch = gelu_fp8.gelu_concat_fp8_fwd

    def recording(prefix, x, prefix_scale=None):
        scaled_calls.append(prefix_scale is not None)
        return launch(prefix, x, prefix_scale)

    monkeypatch.setattr(gelu_fp8, "gelu_concat_fp8_fwd", recording)
    config = EngineConfig(attention=AttentionConfig(backend="cudnn-fp8", fused_norms=True),
                          quant=QuantConfig(transformer="fp8"))  # fmt: skip

    def run():
        pipe = FluxPipeline(**synthetic_components("tiny", device=device, dtype=torch.bfloat16, seed=0))
        engine = FluxEngine.from_pipe(pipe, config)
        return engine(**tiny_call_kwargs()).images.float(), len(engine.transformer.single_transformer_blocks)

    fused, single_blocks = run()
    assert scaled_calls.count(True) == 2 * single_blocks  # two steps
    scaled_calls.clear()
    monkeypatch.setattr(BlockOps, "attention_before_concat", lambda self, q, k, v, linear, act: self.attention(q, k, v))
    unfused, _ = run()
    assert scaled_calls.count(True) == 0 and len(scaled_calls) > 0
    if device.type == "cuda":
        torch.testing.assert_close(fused, unfused, rtol=0, atol=0)
    else:  # the interpreter truncates the scaled prefix to bf16 where PyTorch rounds: 48.8 dB on the CPU (2026-12-01)
        assert psnr(fused, unfused) > 40.0, psnr(fused, unfused)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [200, 4608])
def test_cudnn_kernel_matches_its_emulation_and_bf16_attention(tokens):
    if (reason := ca.unavailable_reason()) is not None:
        pytest.skip(reason)
    for regime in REGIMES:
        q, k, v = flux_like_qkv(64, tokens - 64, 24, 128, regime, device="cuda")
        q8, qd = ca.quantize_tensor(q)
        k8, kd = ca.quantize_tensor(k)
        v8, vs = ca.quantize_v_channels(v)
        out8 = ca.cudnn_fp8_attention_quantized(q8, k8, v8, qd, kd)
        assert out8.dtype == ca.FP8 and out8.transpose(1, 2).is_contiguous()
        emulated = ca.cudnn_fp8_attention_ref(q8, k8, v8, qd, kd).float() * vs
        got = out8.float() * vs
        assert per_head_cosine(got, emulated).min() > 0.998, regime
        exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        # measured 0.9954-0.9992 at 4608 tokens on an H200 (2026-11-30 15:47, attention-cudnn-h200-*.json)
        assert per_head_cosine(ca.cudnn_fp8_attention(q, k, v), exact).min() > 0.99, regime


@pytest.mark.gpu
def test_cudnn_core_in_the_fastest_preset_under_cuda_graphs():
    """The preset with cuDNN's core on the tiny model: near diffusers' image, and a second call at the same size
    neither recompiles nor re-captures."""
    if (reason := ca.unavailable_reason()) is not None:
        pytest.skip(reason)
    from engine.models import synthetic_components

    def components():
        return synthetic_components("tiny", device="cuda", dtype=torch.bfloat16, seed=0)

    baseline = FluxPipeline(**components())(**tiny_call_kwargs()).images.float()
    engine = FluxEngine.from_pipe(FluxPipeline(**components()), "fp8-compile-fastacc-cudagraphs-cudnnattn")
    first = engine(**tiny_call_kwargs()).images.float()
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = engine(**tiny_call_kwargs()).images.float()
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert psnr(first, baseline) > 30.0
