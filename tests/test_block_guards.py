"""engine/block_guards.py: calls diffusers' blocks take that the engine's fused blocks would otherwise fail on deep in a
kernel or get silently wrong (found by probing the drop-in on the tiny model, 2026-12-02): text inputs of batch 1
beside latents of batch 2, diffusers' cache hooks and custom attention processors after optimize(). The reference is
diffusers' own pipeline with the same inputs; kernels under the Triton interpreter on the CPU."""

import pytest
import torch
from conftest import tiny_call_kwargs
from diffusers import FluxPipeline, TaylorSeerCacheConfig
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from engine import EngineConfig, optimize, restore
from engine.attention import EngineDoubleBlock
from engine.config import AttentionConfig, QuantConfig
from engine.errors import ConfigError
from engine.models import synthetic_components


def _pipe(device) -> FluxPipeline:
    return FluxPipeline(**synthetic_components("tiny", device=device, dtype=torch.float32, seed=0))


class _Scaled(FluxAttnProcessor):
    """A custom processor that changes the image (its output times 0.5)."""

    def __call__(self, *args, **kwargs):
        out = super().__call__(*args, **kwargs)
        return tuple(o * 0.5 for o in out) if isinstance(out, tuple) else out * 0.5


@pytest.mark.parametrize(
    "call",
    [
        # two prompts, one negative prompt under true CFG: the negative branch's text is batch 1, the latents batch 2
        {"prompt": ["a red fox", "a blue whale"], "negative_prompt": "blurry", "true_cfg_scale": 2.0},
        # one prompt's latents given at batch 2
        {"latents": torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(5))},
    ],
    ids=["two-prompts-one-negative", "latents-of-batch-2"],
)
def test_text_of_batch_1_beside_latents_of_batch_2_gives_diffusers_images(call, device):
    """diffusers broadcasts the text stream over the latents' batch in its first block; the fused kernels took one
    batch and raised 'layernorm_modulate: shift has shape (2, ...)' from inside a kernel."""
    call = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in call.items()}
    expected = _pipe(device)(**tiny_call_kwargs(output_type="latent", **call)).images
    fast = optimize(_pipe(device), "kernels")
    assert isinstance(fast.transformer.transformer_blocks[0], EngineDoubleBlock)
    out = fast(**tiny_call_kwargs(output_type="latent", **call)).images
    assert out.shape == expected.shape == (2, 16, 64)
    # the kernels preset against diffusers in fp32: measured 4.8e-7 / 9.5e-7, as with a batch of one
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_the_transformer_called_directly_broadcasts_as_diffusers_does(device):
    reference, fast = _pipe(device), optimize(_pipe(device), "kernels")
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(2, 16, 64, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, reference.transformer.config.joint_attention_dim,
                                             generator=generator),
        "pooled_projections": torch.randn(1, reference.transformer.config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.5, 0.5]),  # of the latents' batch, as the pipelines pass it
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
        "guidance": torch.tensor([3.5, 3.5]),
    }  # fmt: skip
    inputs = {name: value.to(device) for name, value in inputs.items()}
    expected = reference.transformer(**inputs, return_dict=False)[0]
    out = fast.transformer(**inputs, return_dict=False)[0]
    assert out.shape == expected.shape == (2, 16, 64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    # positionally too (hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance)
    positional = fast.transformer(*inputs.values(), return_dict=False)[0]
    torch.testing.assert_close(positional, expected, rtol=0, atol=1e-5)


def test_diffusers_cache_hooks_after_optimize_are_refused_and_allowed_again_after_restore(device):
    """A TaylorSeer hook on the attention modules would do nothing under the fused blocks (the image stayed the
    uncached one); the refusal names the engine's own step caches. restore() gives diffusers' transformer back."""
    pipe = optimize(_pipe(device), "kernels")
    config = TaylorSeerCacheConfig(cache_interval=2)
    with pytest.raises(ConfigError, match=r"enable_cache\(TaylorSeerCacheConfig\).*step_cache"):
        pipe.transformer.enable_cache(config)
    restore(pipe)
    pipe.transformer.enable_cache(config)  # diffusers' own method again
    pipe.transformer.disable_cache()


def test_custom_attention_processors_are_refused_before_and_after_optimize(device):
    """The fused blocks never call a processor: one that halves the attention output changed nothing on the kernels
    preset (diff 4.4e-2 from diffusers with it)."""
    pipe = optimize(_pipe(device), "kernels")
    with pytest.raises(ConfigError, match=r"set_attn_processor\(_Scaled\) after optimize"):
        pipe.transformer.set_attn_processor(_Scaled())
    pipe.transformer.set_attn_processor(FluxAttnProcessor())  # diffusers' own: what the fused blocks compute
    custom = _pipe(device)
    custom.transformer.set_attn_processor(_Scaled())
    with pytest.raises(ConfigError, match=r"attention processors \['_Scaled'\].*'baseline' or 'compile' preset"):
        optimize(custom, "kernels")
    # nothing was converted: the pipeline is diffusers' as it was
    assert not isinstance(custom.transformer.transformer_blocks[0], EngineDoubleBlock)
    optimize(custom, "baseline")  # diffusers' blocks call it: allowed


@pytest.mark.parametrize("how", ["set_processor", "assigned"])
def test_a_processor_set_on_one_attention_module_after_optimize_is_refused_at_the_call(device, how):
    """Only the transformer's set_attn_processor was refused: a processor set on one block's attention module was
    taken and never called (the kernels preset's image was the unmodified one, 0.017 from diffusers' with it)."""
    pipe = optimize(_pipe(device), "kernels")
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(**tiny_call_kwargs()).images
    attn = pipe.transformer.transformer_blocks[0].attn
    attn.set_processor(_Scaled()) if how == "set_processor" else setattr(attn, "processor", _Scaled())
    with pytest.raises(ConfigError, match=r"transformer_blocks\.0\.attn has the attention processor _Scaled.*Nothing"):
        pipe(**tiny_call_kwargs())
    attn.set_processor(FluxAttnProcessor())  # diffusers' own back: the calls run again
    torch.testing.assert_close(pipe(**tiny_call_kwargs()).images, expected, rtol=0, atol=0)


@pytest.mark.parametrize("quant", ["none", "fp8"])
def test_diffusers_fuse_qkv_projections_after_optimize_leaves_the_fused_blocks_as_they_are(quant):
    """transformer.fuse_qkv_projections() after optimize(): diffusers' fusing failed inside diffusers on fp8's
    quantised parts (IndexError) and, on bf16 ones, added a copy of every QKV weight that the blocks never read. The
    blocks' projections are fused already: nothing is done, and the image is the same."""
    config = EngineConfig(attention=AttentionConfig(backend="auto"), quant=QuantConfig(transformer=quant))
    pipe = optimize(_pipe("cpu"), config)
    before = pipe(**tiny_call_kwargs()).images
    pipe.transformer.fuse_qkv_projections()
    assert not any(hasattr(module, "to_qkv") for module in pipe.transformer.modules())
    assert torch.equal(pipe(**tiny_call_kwargs()).images, before)
    pipe.transformer.unfuse_qkv_projections()
    assert torch.equal(pipe(**tiny_call_kwargs()).images, before)


def test_fused_projections_stay_views_through_a_dtype_change(device):
    """pipe.to(bf16) after optimize: the QKV parts stay views of the fused weight (before, they became copies: their
    memory twice, and a later load_state_dict updated them but not the fused QKV the blocks read)."""
    pipe = optimize(_pipe(device), "kernels")
    pipe.to(torch.bfloat16)
    block = pipe.transformer.transformer_blocks[0]
    fused, parts = block.qkv.weight, [block.attn.to_q.weight, block.attn.to_k.weight, block.attn.to_v.weight]
    assert fused.dtype == torch.bfloat16
    assert [part.data_ptr() for part in parts] == [fused[i * len(parts[0]) :].data_ptr() for i in range(3)]
    other = synthetic_components("tiny", device=device, dtype=torch.bfloat16, seed=1)["transformer"].state_dict()
    pipe.transformer.load_state_dict(other, strict=False)  # strict: the fused keys are the engine's own
    assert torch.equal(fused, torch.cat([other[f"transformer_blocks.0.attn.to_{p}.weight"] for p in "qkv"]))
    # the biases too (before, they stayed copies after the conversion: the blocks kept the old QKV biases)
    assert torch.equal(block.qkv.bias, torch.cat([other[f"transformer_blocks.0.attn.to_{p}.bias"] for p in "qkv"]))
    single = pipe.transformer.single_transformer_blocks[0]
    assert torch.equal(single.linear1.weight[: single.attn.to_q.weight.shape[0]],
                       other["single_transformer_blocks.0.attn.to_q.weight"])  # fmt: skip


def test_diffusers_state_dicts_load_and_save_through_the_fused_blocks(device, tmp_path):
    """load_state_dict of diffusers' keys (strict, and with assign=True) reaches the fused QKV; save_pretrained
    writes a folder diffusers loads with diffusers' keys and values (safetensors refused the parts' shared memory)."""
    from diffusers import FluxTransformer2DModel

    pipe = optimize(_pipe(device), "kernels")
    other = synthetic_components("tiny", device=device, dtype=torch.float32, seed=1)["transformer"].state_dict()
    for assign in (False, True):
        pipe.transformer.load_state_dict({k: v.clone() for k, v in other.items()}, strict=True, assign=assign)
        block = pipe.transformer.transformer_blocks[1]
        assert torch.equal(block.txt_qkv.weight, torch.cat([other[f"transformer_blocks.1.attn.add_{p}_proj.weight"]
                                                            for p in "qkv"]))  # fmt: skip
        assert torch.equal(block.txt_qkv.bias, torch.cat([other[f"transformer_blocks.1.attn.add_{p}_proj.bias"]
                                                          for p in "qkv"]))  # fmt: skip
        rows = len(block.attn.add_q_proj.weight)
        assert block.attn.add_k_proj.weight.data_ptr() == block.txt_qkv.weight[rows:].data_ptr()
        assert block.attn.add_k_proj.bias.data_ptr() == block.txt_qkv.bias[rows:].data_ptr()
    pipe.transformer.save_pretrained(tmp_path / "transformer")
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer").state_dict()
    assert loaded.keys() == other.keys()
    assert all(torch.equal(loaded[key].cpu(), other[key].cpu()) for key in other)
    # state_dict() too (before, it listed the fused layers' keys beside diffusers': "Unexpected key(s)" in diffusers)
    state = pipe.transformer.state_dict()
    assert state.keys() == other.keys()
    plain = synthetic_components("tiny", device=device, dtype=torch.float32, seed=2)["transformer"]
    plain.load_state_dict(state, strict=True)
    assert all(torch.equal(plain.state_dict()[key], other[key]) for key in other)


def test_a_quantised_transformer_is_not_saved_in_diffusers_format(tmp_path):
    from engine import EngineConfig
    from engine.config import AttentionConfig, QuantConfig

    attention = AttentionConfig(backend="sdpa", fused_norms=True)
    config = EngineConfig(attention=attention, quant=QuantConfig(transformer="fp8"))
    pipe = optimize(FluxPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.bfloat16, seed=0)), config)
    with pytest.raises(ConfigError, match=r"quantised .*engine.quant.save_quantized.*Nothing was written"):
        pipe.transformer.save_pretrained(tmp_path / "transformer")
    assert not (tmp_path / "transformer").exists()


@pytest.mark.gpu
def test_optimize_leaves_the_default_cuda_generator_alone():
    """engine.warmup and the attention core's choice draw their inputs from generators of their own: a call with
    generator=None after torch.manual_seed gets diffusers' noise."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pipe = FluxPipeline(**synthetic_components("tiny", device="cuda", dtype=torch.bfloat16, seed=0))
    torch.manual_seed(0)
    state = torch.cuda.get_rng_state()
    optimize(pipe, "kernels")  # backend 'auto': times both cores on random inputs; then the warm-up
    assert torch.equal(torch.cuda.get_rng_state(), state)


def _ip_adapter_pipe(device="cpu", dtype=torch.float32):
    """The tiny pipeline with a tiny CLIP image encoder (nothing to download) and an XLabs-layout IP-Adapter state
    dict for it (a helper's probe, 2026-12-03)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)  # fmt: skip
    torch.manual_seed(1)
    encoder = CLIPVisionModelWithProjection(config).eval().requires_grad_(False)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = FluxPipeline(**synthetic_components("tiny", device=device, dtype=dtype, seed=0),
                        image_encoder=encoder.to(device, dtype), feature_extractor=processor)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(2)
    inner, joint, tokens = 128, pipe.transformer.config.joint_attention_dim, 4
    state = {"image_proj": {"proj.weight": torch.randn(tokens * joint, 16, generator=generator) * 0.3,
                            "proj.bias": torch.randn(tokens * joint, generator=generator) * 0.3,
                            "norm.weight": torch.ones(joint), "norm.bias": torch.zeros(joint)},
             "ip_adapter": {}}  # fmt: skip
    for index in range(len(pipe.transformer.transformer_blocks)):
        for name in ("to_k_ip", "to_v_ip"):
            state["ip_adapter"][f"{index}.{name}.weight"] = torch.randn(inner, joint, generator=generator) * 0.3
            state["ip_adapter"][f"{index}.{name}.bias"] = torch.randn(inner, generator=generator) * 0.3
    return pipe, state


def test_an_ip_adapter_on_the_fused_blocks_is_refused_before_diffusers_changes_anything():
    """Before: load_ip_adapter after optimize() was refused only at the processors, after diffusers had set the
    transformer's encoder_hid_proj to None (and, from a file, loaded and registered a CLIP image encoder); one loaded
    before optimize() was refused with a fix that dropped the adapter without a word."""
    from PIL import Image

    pipe, state = _ip_adapter_pipe()
    picture = Image.new("RGB", (40, 40), (200, 30, 90))
    optimize(pipe, "kernels")
    transformer, encoder = pipe.transformer, pipe.image_encoder
    marker = transformer.encoder_hid_proj = torch.nn.Identity()  # what diffusers' load would set to None first
    with pytest.raises(ConfigError, match=r"load_ip_adapter after optimize\(\).*Nothing was loaded.*'compile'"):
        pipe.load_ip_adapter(state, weight_name="unused.safetensors")
    assert transformer.encoder_hid_proj is marker and pipe.image_encoder is encoder
    from engine import FluxEngine

    shared = FluxEngine.from_pipe(pipe, "kernels")  # another pipeline over the same transformer, the same config
    with pytest.raises(ConfigError, match=r"load_ip_adapter after optimize\(\).*Nothing was loaded"):
        shared.load_ip_adapter(state, weight_name="unused.safetensors")
    assert transformer.encoder_hid_proj is marker
    transformer.encoder_hid_proj = None
    restore(pipe)  # diffusers' blocks again: diffusers' own load_ip_adapter
    pipe.load_ip_adapter(state, weight_name="unused.safetensors")
    expected = pipe(**tiny_call_kwargs(ip_adapter_image=picture)).images
    with pytest.raises(ConfigError, match=r"FluxIPAdapterAttnProcessor.*pipe\.unload_ip_adapter\(\) first"):
        optimize(pipe, "kernels")
    optimize(pipe, "compile")  # diffusers' blocks, compiled: they run the adapter
    torch.testing.assert_close(pipe(**tiny_call_kwargs(ip_adapter_image=picture)).images, expected, atol=1e-5, rtol=0)


def test_ip_adapter_scales_on_compiled_blocks_recompile_nothing_and_give_diffusers_images():
    """Before: each new IP-Adapter scale was a constant of the compiled blocks (dynamo specialises floats there): a
    recompile per value, and after eight `FailOnRecompileLimitHit`; a per-block ramp failed at its first call."""
    from PIL import Image
    from torch._dynamo.utils import counters

    picture = Image.new("RGB", (40, 40), (200, 30, 90))
    plain, state = _ip_adapter_pipe()
    plain.load_ip_adapter(state, weight_name="unused.safetensors")
    ours, _ = _ip_adapter_pipe()
    ours.load_ip_adapter(state, weight_name="unused.safetensors")
    optimize(ours, "compile")
    blocks = len(plain.transformer.transformer_blocks)
    scales = [0.0, 1.0, *(0.1 * step for step in range(1, 9)), [0.25 * (1 + i) for i in range(blocks)]]
    for index, scale in enumerate(scales):
        for pipe in (plain, ours):
            pipe.set_ip_adapter_scale(scale)
        expected = plain(**tiny_call_kwargs(ip_adapter_image=picture)).images
        recompiles = counters["stats"]["unique_graphs"]
        images = ours(**tiny_call_kwargs(ip_adapter_image=picture)).images
        if index > 0:  # the first call compiles
            assert counters["stats"]["unique_graphs"] == recompiles, f"scale {scale} compiled again"
        # compiled fp32 against eager: the sums' order (the compile preset's 131 dB on the tiny model)
        torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
    restore(ours)  # the floats back, as diffusers keeps them
    kept = [p.scale for p in ours.transformer.attn_processors.values() if hasattr(p, "scale")]
    assert kept == [[value] for value in scales[-1]]  # the ramp's floats as set, not their fp32 roundings


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", ["inductor", "graphs-only"])
def test_ip_adapter_scales_on_compiled_blocks_on_the_gpu(compiled):
    """In bf16 on the GPU: new IP-Adapter scales and a per-block ramp recompile nothing. Only inductor's compiled
    blocks take the scales as fp32 tensors (it multiplies by an fp32 scalar as with the float); under the forward's
    CUDA graphs alone (whose replays an IP-Adapter call never takes) they stay floats (eager CUDA rounds a tensor
    scale to bf16 first), and the image is diffusers' to the bit."""
    from PIL import Image
    from torch._dynamo.utils import counters

    from engine.config import CacheConfig, CompileConfig
    from engine.measure import psnr

    picture = Image.new("RGB", (40, 40), (200, 30, 90))
    plain, state = _ip_adapter_pipe("cuda", torch.bfloat16)
    plain.load_ip_adapter(state, weight_name="unused.safetensors")
    ours, _ = _ip_adapter_pipe("cuda", torch.bfloat16)
    ours.load_ip_adapter(state, weight_name="unused.safetensors")
    compile_config = (CompileConfig(mode="none", cuda_graphs=True) if compiled == "graphs-only" else
                      CompileConfig(mode="regional", backend=compiled))  # fmt: skip
    optimize(ours, EngineConfig(compile=compile_config, cache=CacheConfig(enabled=False)))
    blocks = len(plain.transformer.transformer_blocks)
    previous = None
    for index, scale in enumerate([1.0, 0.3, 0.7, 0.9, [0.25 * (1 + i) for i in range(blocks)], 0.0]):
        for pipe in (plain, ours):
            pipe.set_ip_adapter_scale(scale)
        expected = plain(**tiny_call_kwargs(ip_adapter_image=picture)).images
        graphs_before = counters["stats"]["unique_graphs"]
        images = ours(**tiny_call_kwargs(ip_adapter_image=picture)).images
        if index > 0:
            assert counters["stats"]["unique_graphs"] == graphs_before, f"scale {scale} compiled again"
        if compiled != "inductor":
            assert torch.equal(images, expected)
        elif previous is not None:  # inductor's kernels round otherwise: closer to this scale's image than the last
            assert psnr(images.float(), expected.float()) > psnr(images.float(), previous.float()) + 6.0
        previous = expected
