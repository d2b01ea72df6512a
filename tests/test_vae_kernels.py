"""engine/vae_kernels.py: the VAE's middle-block attention as two GEMMs around a softmax, against diffusers' own
processor (F.scaled_dot_product_attention), and its GroupNorms through flux_kernels.group_norm (the Triton
interpreter on the CPU); their installation and undo on a pipeline, and the attention's custom op. fp32 on the CPU:
the images differ from diffusers' only by rounding here (the bf16 scores' extra rounding on the GPU is measured
there: benchmarks/NOTES.md)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_call_kwargs
from diffusers import FluxPipeline
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from engine.config import ConfigError, EngineConfig, VaeConfig, preset
from engine.vae_kernels import ChunkedAttnProcessor, apply_vae_kernels, chunked_attention
from flux_kernels import group_norm as group_norm_module
from flux_kernels import residual_add as residual_add_module
from flux_kernels import upsample_nearest as upsample_module
from flux_kernels.group_norm import runs_here


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch, heads, q_len, k_len, head_dim, chunk", [
    (1, 1, 64, 64, 32, 16),  # chunks that divide the queries
    (2, 3, 37, 50, 16, 8),  # a last, shorter chunk; several batches and heads; cross lengths
    (1, 1, 20, 20, 512, 4096),  # one chunk: fewer queries than a chunk; the VAE's head width
])  # fmt: skip
def test_chunked_attention_is_sdpa(batch, heads, q_len, k_len, head_dim, chunk):
    q = randn(batch, heads, q_len, head_dim, seed=1)
    k, v = randn(batch, heads, k_len, head_dim, seed=2) * 2, randn(batch, heads, k_len, head_dim, seed=3)
    out = chunked_attention(q, k, v, chunk=chunk)
    assert out.shape == q.shape and out.is_contiguous()
    # fp32, another summation order: measured max difference 3.6e-6 with 512 channels (~1e-7 with 16-32); a wrong
    # scale or a chunk seam is >= 1e-2
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_the_custom_op_matches_its_fake_and_the_function():
    q, k, v = randn(1, 2, 9, 8, seed=4), randn(1, 2, 9, 8, seed=5), randn(1, 2, 9, 8, seed=6)
    torch.library.opcheck(torch.ops.flux_engine.vae_chunked_attention.default, (q, k, v))
    assert torch.equal(torch.ops.flux_engine.vae_chunked_attention(q, k, v), chunked_attention(q, k, v))


@pytest.fixture
def pipe(tiny_components):
    return FluxPipeline(**{**tiny_components, "vae": copy.deepcopy(tiny_components["vae"])})


def vae_attentions(vae) -> list[Attention]:
    return [m for m in vae.modules() if isinstance(m, Attention)]


def test_the_pipeline_decodes_as_diffusers_and_undo_restores_the_processors(pipe, monkeypatch):
    attentions = vae_attentions(pipe.vae)
    assert len(attentions) == 2  # the decoder's and the encoder's middle block
    originals = [a.processor for a in attentions]
    assert all(type(p) is AttnProcessor2_0 for p in originals)
    norms = [m for m in pipe.vae.modules() if isinstance(m, torch.nn.GroupNorm)]
    expected = pipe(**tiny_call_kwargs(output_type="pt")).images
    images = randn(1, 3, 64, 64)
    with torch.no_grad():
        encoded = pipe.vae.encode(images).latent_dist.mean
    undo = apply_vae_kernels(pipe, VaeConfig(kernels=True))
    assert undo is not None and all(isinstance(a.processor, ChunkedAttnProcessor) for a in attentions)
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    calls = {"bmm": 0, "group_norm": 0, "group_norm_fused": 0, "residual_add": 0, "upsample": 0}
    bmm, group_norm_fwd = torch.bmm, group_norm_module.group_norm_fwd
    residual_add_fwd, upsample_fwd = residual_add_module.residual_add_fwd, upsample_module.upsample_nearest2x_fwd

    def counting(name, function):
        def count(*args, **kwargs):
            calls[name] += 1
            if name == "group_norm" and kwargs.get("input_bias", args[5] if len(args) > 5 else None) is not None:
                calls["group_norm_fused"] += 1
            return function(*args, **kwargs)

        return count

    monkeypatch.setattr(torch, "bmm", counting("bmm", bmm))
    monkeypatch.setattr(group_norm_module, "group_norm_fwd", counting("group_norm", group_norm_fwd))
    monkeypatch.setattr(residual_add_module, "residual_add_fwd", counting("residual_add", residual_add_fwd))
    monkeypatch.setattr(upsample_module, "upsample_nearest2x_fwd", counting("upsample", upsample_fwd))
    image = pipe(**tiny_call_kwargs(output_type="pt")).images
    assert calls["bmm"], "the chunked attention did not run in the decode"
    decoder_norms = [m for m in pipe.vae.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    if runs_here(torch.zeros(1, 4, 2, 2)):  # the Triton interpreter on CPU tensors (CI)
        # the Triton GroupNorm ran for every norm of the decoder: NHWC after the channels_last convolutions, the
        # attention's [B, C, L] view of NHWC channels innermost too
        assert calls["group_norm"] == len(decoder_norms)
        # every ResnetBlock2D fused (the first convolution's bias in its second norm, the second's in the residual
        # sum), every Upsample2D's nearest 2x through the kernel
        resnets = [m for m in pipe.vae.decoder.modules() if type(m).__name__ == "ResnetBlock2D"]
        upsamplers = [m for m in pipe.vae.decoder.modules() if type(m).__name__ == "Upsample2D"]
        assert len(resnets) == 10 and len(upsamplers) == 3  # the middle block's 2, 4 up blocks of 2
        assert calls["group_norm_fused"] == calls["residual_add"] == len(resnets)
        assert calls["upsample"] == len(upsamplers)
    else:  # CPU tensors on a machine with CUDA, no interpreter: PyTorch's ops throughout
        assert calls["group_norm"] == calls["residual_add"] == calls["upsample"] == 0
    # measured: max difference 1.6e-6 on [0, 1] images, 2.0e-6 on the encoding (fp32: only the summation order differs)
    torch.testing.assert_close(image, expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(pipe.vae.encode(images).latent_dist.mean, encoded, rtol=0, atol=1e-5)
    monkeypatch.undo()
    undo()
    assert [a.processor for a in attentions] == originals
    assert norms and not any("forward" in m.__dict__ for m in pipe.vae.modules())
    assert pipe.vae.decoder.conv_in.weight.is_contiguous() and pipe.vae.encoder.conv_in.weight.is_contiguous()
    assert torch.equal(pipe(**tiny_call_kwargs(output_type="pt")).images, expected)


def test_sdpa_installs_nothing_and_a_foreign_processor_is_left_alone(pipe):
    assert apply_vae_kernels(pipe, VaeConfig()) is None
    attentions = vae_attentions(pipe.vae)
    assert all(type(a.processor) is AttnProcessor2_0 for a in attentions)
    mine = AttnProcessor()
    attentions[0].set_processor(mine)
    undo = apply_vae_kernels(pipe, VaeConfig(kernels=True))
    assert attentions[0].processor is mine and isinstance(attentions[1].processor, ChunkedAttnProcessor)
    undo()
    assert attentions[0].processor is mine and type(attentions[1].processor) is AttnProcessor2_0


def test_a_mask_goes_to_the_replaced_processor(pipe):
    """What the chunked path does not cover (a mask, cross-attention) runs the original processor."""
    attention = vae_attentions(pipe.vae)[0]
    processor = ChunkedAttnProcessor(attention.processor)
    hidden = randn(1, 6, attention.to_q.in_features, seed=7)
    mask = torch.zeros(1, 6, 6)
    mask[..., :2] = -1e4
    with torch.no_grad():
        expected = AttnProcessor2_0()(attention, hidden, attention_mask=mask)
        torch.testing.assert_close(processor(attention, hidden, attention_mask=mask), expected, rtol=0, atol=0)


def test_what_the_fused_resnet_does_not_cover_runs_diffusers_forward(pipe, monkeypatch):
    """A block training with dropout, or one with a time embedding: diffusers' own ResnetBlock2D.forward, unchanged
    (the same dropout draws under one seed); the same block in eval: the fused path, within fp32 rounding."""
    from diffusers.models.resnet import ResnetBlock2D

    vae_like = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=None, groups=4, dropout=0.5)
    timed = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=12, groups=4)
    pipe.vae.decoder.mid_block.resnets[0], pipe.vae.decoder.mid_block.resnets[1] = vae_like, timed
    undo = apply_vae_kernels(pipe, VaeConfig(kernels=True))
    assert "forward" in vae_like.__dict__ and "forward" in timed.__dict__
    fused = []
    residual_add_fwd = residual_add_module.residual_add_fwd
    monkeypatch.setattr(
        residual_add_module, "residual_add_fwd", lambda *a, **k: fused.append(1) or residual_add_fwd(*a, **k)
    )
    x = randn(1, 8, 6, 6, seed=8).to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.manual_seed(0)
        expected = ResnetBlock2D.forward(vae_like.train(), x, None)
        torch.manual_seed(0)
        assert torch.equal(vae_like(x, None), expected) and not fused
        temb = randn(1, 12, seed=9)
        assert torch.equal(timed.eval()(x, temb), ResnetBlock2D.forward(timed, x, temb)) and not fused
        vae_like.eval()
        out = vae_like(x, None)
        # fp32: measured 2.4e-7 (the biases added in the norm and the residual sum instead of after each convolution)
        torch.testing.assert_close(out, ResnetBlock2D.forward(vae_like, x, None), rtol=0, atol=1e-5)
        assert fused == [1] or not runs_here(x)
    undo()
    assert "forward" not in vae_like.__dict__ and "forward" not in timed.__dict__


def test_optimize_registers_the_undo_and_the_fastest_presets_use_it(pipe):
    from engine import optimize
    from engine.pipeline import restore

    optimize(pipe, EngineConfig(vae=VaeConfig(kernels=True)))
    assert "vae-kernels" in [step.name for step in pipe.engine_steps]
    assert all(isinstance(a.processor, ChunkedAttnProcessor) for a in vae_attentions(pipe.vae))
    restore(pipe)
    assert all(type(a.processor) is AttnProcessor2_0 for a in vae_attentions(pipe.vae))
    assert preset("fp8-compile-fastacc-cudagraphs").vae.kernels
    assert preset("fp8-compile-fastacc-cudagraphs-cudnnattn-compiledvae").vae.kernels
    assert not preset("baseline").vae.kernels and not preset("kernels-compile").vae.kernels


def test_a_bad_kernels_value_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"vae.kernels='yes' must be True or False"):
        VaeConfig(kernels="yes")


@pytest.mark.gpu
def test_bf16_at_the_vae_shape_stays_close_to_sdpa():
    """The FLUX VAE's attention at 1024^2 (16,384 tokens, one head of 512) in bf16: the scores rounded to bf16 cost
    a little against SDPA's fused kernel, which keeps them in fp32."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 1, 16384, 512, device="cuda", dtype=torch.bfloat16, generator=generator)
               for _ in range(3))  # fmt: skip
    out, reference = chunked_attention(q, k, v), F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    # measured on an H200: 9.8e-4 (2026-11-30, results/profile-vae-h200-20261130-2152.json); outputs ~0.03 in size,
    # so a wrong scale or a chunk seam would be 1e-2 and more
    assert (out.float() - reference.float()).abs().max().item() < 4e-3
