"""optimize() on diffusers' FluxControlNetPipeline, its ControlNet optimised as the transformer (engine/controlnet.py),
against the same class plain, on the tiny model and a tiny ControlNet (engine.models.controlnet: 1 double-stream and
1 single-stream block, its zero-initialised projections drawn at random as a trained one's are not zero) in fp32 on
the CPU: the baseline is diffusers to the bit, the fused blocks within fp32 rounding, fp8 within its own tolerance;
and what a config cannot do to a ControlNet is refused before anything changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxControlNetPipeline
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from PIL import Image
from torch import nn
from torch._dynamo.utils import counters

from engine import EngineConfig, optimize, restore
from engine.attention import EngineDoubleBlock, EngineSingleBlock
from engine.config import AttentionConfig, CompileConfig, OffloadConfig, QuantConfig
from engine.errors import ConfigError
from engine.measure import psnr, sqnr_db
from engine.models import controlnet_config, synthetic_components, synthetic_controlnet
from engine.quant import Fp8Linear, quantize_model

SIZE = 64
FUSED = EngineConfig(attention=AttentionConfig(backend="auto"))  # the fused blocks in PyTorch (no Triton on a CPU)
FP8 = EngineConfig(attention=AttentionConfig(backend="auto"), quant=QuantConfig(transformer="fp8"))
COMPILED = EngineConfig(
    attention=AttentionConfig(backend="auto"), compile=CompileConfig(mode="regional", backend="eager")
)


def _picture(seed: int, height: int = SIZE, width: int = SIZE) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _pipeline(config=None, nets: int = 1, dtype=torch.float32) -> FluxControlNetPipeline:
    """The tiny pipeline with one ControlNet, or a FluxMultiControlNetModel of `nets` (seeds 1, 2, ...: not the
    transformer's 0, so the ControlNet's blocks are not copies of the transformer's first ones)."""
    controlnets = [synthetic_controlnet("tiny", dtype=dtype, seed=1 + index) for index in range(nets)]
    components = synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)
    pipe = FluxControlNetPipeline(**components, controlnet=controlnets[0] if nets == 1 else controlnets)
    if config is not None:
        assert optimize(pipe, config) is pipe
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, height: int = SIZE, width: int = SIZE) -> torch.Tensor:
    nets = len(getattr(pipe.controlnet, "nets", [None]))
    control = [_picture(3 + index, height, width) for index in range(nets)]
    scale = [0.7, 0.5][:nets]
    call = dict(prompt="a red fox", height=height, width=width, num_inference_steps=2, guidance_scale=3.5,
                generator=torch.Generator().manual_seed(0), max_sequence_length=32, output_type="pt")  # fmt: skip
    if nets == 1:
        control, scale = control[0], scale[0]
    return pipe(**call, control_image=control, controlnet_conditioning_scale=scale).images.float()


def _blocks(net) -> list[nn.Module]:
    return [*net.transformer_blocks, *net.single_transformer_blocks]


def test_the_synthetic_controlnet_is_the_real_layout_and_changes_the_image():
    real = controlnet_config("flux-dev")
    assert (real["num_layers"], real["num_single_layers"], real["attention_head_dim"]) == (5, 10, 128)
    net = synthetic_controlnet("tiny", dtype=torch.float32, seed=1)
    assert (len(net.transformer_blocks), len(net.single_transformer_blocks)) == (1, 1)
    again = synthetic_controlnet("tiny", dtype=torch.float32, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), again.parameters(), strict=True))
    # diffusers zero-initialises the residual projections: a ControlNet left so adds nothing to the image, and every
    # comparison below would pass whatever optimize() did to it
    assert net.controlnet_blocks[0].weight.abs().min() > 0
    pipe = _pipeline()
    with_control = _images(pipe)
    for projection in (*pipe.controlnet.controlnet_blocks, *pipe.controlnet.controlnet_single_blocks):
        nn.init.zeros_(projection.weight)  # as diffusers leaves them
        nn.init.zeros_(projection.bias)
    assert psnr(_images(pipe), with_control) < 40.0


@pytest.mark.parametrize("nets", [1, 2])
def test_controlnet_pipeline_keeps_diffusers_images(nets):
    plain = _images(_pipeline(nets=nets))
    assert torch.equal(_images(_pipeline("baseline", nets)), plain)
    # fused QKV GEMMs sum in another order than three GEMMs: fp32 rounding (tests/test_pipeline_classes.py)
    torch.testing.assert_close(_images(_pipeline(FUSED, nets)), plain, atol=1e-5, rtol=0)
    # fp8 within its text-to-image tolerance (tests/test_quantize.py: 45 dB); measured 68 dB with one ControlNet
    assert psnr(_images(_pipeline(FP8, nets)), plain) >= 45.0


@pytest.mark.parametrize(("policy", "nets"), [("block", 1), ("leaf", 2)])
def test_streamed_offload_streams_every_controlnet_too(policy, nets):
    """offload block / leaf: each ControlNet's blocks stream from host memory as the transformer's do (between
    forwards they point into a host buffer), and the image is the resident pipeline's to the bit."""
    plain = _images(_pipeline(FUSED, nets))
    pipe = _pipeline(EngineConfig(attention=AttentionConfig(backend="auto"), offload=OffloadConfig(policy)), nets)
    names = ["controlnet"] if nets == 1 else [f"controlnet.nets.{index}" for index in range(nets)]
    assert set(pipe.offload_state.streamers) >= {"transformer", *names}
    for name in names:
        host = pipe.offload_state.streamers[name].host.tensor
        start, stop = host.data_ptr(), host.data_ptr() + host.numel()
        net = pipe.controlnet if nets == 1 else pipe.controlnet.nets[int(name.rsplit(".", 1)[1])]
        linears = [m for block in _blocks(net) for m in block.modules() if isinstance(m, nn.Linear)]
        assert linears and all(start <= m.weight.data_ptr() < stop for m in linears)
    assert torch.equal(_images(pipe), plain)
    assert pipe.offload_state.streamers[names[0]].stats.copies > 0  # its units did stream
    restore(pipe)
    assert torch.equal(_images(pipe), plain)


@pytest.mark.parametrize("nets", [1, 2])
def test_every_controlnet_gets_the_transformers_blocks_and_quantisation(nets):
    pipe = _pipeline(FP8, nets)
    controlnets = list(getattr(pipe.controlnet, "nets", [pipe.controlnet]))
    assert pipe.engine_steps.names()[:3] == ["attention", "quantization", "controlnet"]
    assert len(pipe.controlnet_state.quantized) == nets
    for net in controlnets:
        assert [type(block) for block in _blocks(net)] == [EngineDoubleBlock, EngineSingleBlock]
        assert all(block.flux_ops is pipe.attention_ops for block in _blocks(net))
        assert isinstance(net.transformer_blocks[0].qkv, Fp8Linear)
        assert isinstance(net.single_transformer_blocks[0].linear1, Fp8Linear)
        # kept in the model's dtype, as the transformer's x_embedder / proj_out: the inputs and the residuals out
        for kept in (net.x_embedder, net.controlnet_x_embedder, net.controlnet_blocks[0], net.time_text_embed.
                     timestep_embedder.linear_1):  # fmt: skip
            assert type(kept) is nn.Linear


def _controlnet_inputs(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    image_tokens, text_tokens = 16, 8  # [B, L, C]: a 64x64 image's 4x4 patches, a short prompt

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    return dict(hidden_states=randn(1, image_tokens, 64), controlnet_cond=randn(1, image_tokens, 64),
                encoder_hidden_states=randn(1, text_tokens, 32), pooled_projections=randn(1, 32),
                timestep=torch.tensor([0.6]), guidance=torch.tensor([3.5]), img_ids=randn(image_tokens, 3),
                txt_ids=torch.zeros(text_tokens, 3), conditioning_scale=0.7, return_dict=False)  # fmt: skip


def test_the_quantised_controlnet_computes_in_fp8():
    """Its residuals on fresh inputs differ from the plain ControlNet's (a ControlNet left untouched gives the same
    bits) within fp8's error: the block Linears measure ~29 dB each (engine.quant.policy); 25 dB over two blocks."""
    plain = _pipeline().controlnet(**_controlnet_inputs())
    optimised = _pipeline(FP8).controlnet(**_controlnet_inputs())
    for samples, reference in zip(optimised, plain, strict=True):
        for sample, expected in zip(samples, reference, strict=True):
            assert not torch.equal(sample, expected)
            assert sqnr_db(sample, expected) >= 25.0


def test_compiled_controlnet_holds_fullgraph_without_recompiles_and_restores():
    torch._dynamo.reset()
    counters.clear()
    plain = _pipeline()
    pipe = _pipeline(COMPILED)
    assert pipe.controlnet_state.compile_state.compiled_modules == [
        "controlnet.transformer_blocks x1",
        "controlnet.single_transformer_blocks x1",
        "controlnet.time_text_embed",
    ]
    assert all(block._compiled_call_impl is not None for block in _blocks(pipe.controlnet))
    torch.testing.assert_close(_images(pipe), _images(plain), atol=1e-5, rtol=0)
    graphs = counters["stats"]["unique_graphs"]
    # the transformer's 4 (tests/test_compile.py), one more per block class (the ControlNet calls its blocks without
    # joint_attention_kwargs, the transformer with {}: the fused blocks check them, dynamo guards on that), and a second
    # variant of the ControlNet's single block (TORCH_LOGS=recompiles: dynamo's duck sizing first took two equal
    # strides of its inputs for one symbol)
    assert graphs == 7
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(_images(pipe, 48, 80), _images(plain, 48, 80), atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"]
    restore(pipe)  # unquantised: every step undone, the ControlNet's too
    assert [type(block) for block in _blocks(pipe.controlnet)] == [FluxTransformerBlock, FluxSingleTransformerBlock]
    assert pipe.controlnet.transformer_blocks[0]._compiled_call_impl is None
    assert torch.equal(_images(pipe), _images(plain))


def test_a_controlnet_that_does_not_fit_the_transformer_is_refused():
    pipe = _pipeline(nets=2)
    quantize_model(pipe.controlnet.nets[1], "fp8", "controlnet", record_sqnr=False)
    int8 = EngineConfig(quant=QuantConfig(transformer="int8-weight"))
    with pytest.raises(ConfigError, match="pipe.controlnet.nets.1 is already quantised as 'fp8'.*'int8-weight'"):
        optimize(pipe, int8)
    assert type(pipe.controlnet.nets[0].transformer_blocks[0].ff.net[2]) is nn.Linear  # nothing was quantised
    bf16 = _pipeline(dtype=torch.bfloat16)
    with pytest.raises(
        ConfigError, match="pipe.controlnet is on cpu in torch.bfloat16, the transformer on cpu in torch.float32"
    ):
        optimize(bf16, FUSED)
    optimize(bf16, "baseline")  # the baseline leaves it to diffusers, as it leaves everything


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("nets", [1, 2])
def test_the_controlnet_residuals_enter_the_cuda_graph_on_the_gpu(nets):
    """compile.cuda_graphs with a ControlNet (or two): the transformer's graph takes their residuals as inputs, copied
    in before each replay. Against the same config without graphs (the same kernels and compiled regions, so the
    same bits, as tests/test_compile.py's replay test), over two sizes and a changed conditioning scale; one capture
    per size, and a repeated call captures nothing new."""

    def pipeline(cuda_graphs: bool) -> FluxControlNetPipeline:
        nets_ = [synthetic_controlnet("tiny", device="cuda", dtype=torch.bfloat16, seed=1 + i) for i in range(nets)]
        components = synthetic_components("tiny", device="cuda", dtype=torch.bfloat16, seed=0)
        pipe = FluxControlNetPipeline(**components, controlnet=nets_[0] if nets == 1 else nets_)
        attention = AttentionConfig(backend="auto", fused_norms=True)
        optimize(pipe, EngineConfig(attention=attention, compile=CompileConfig("regional", cuda_graphs=cuda_graphs)))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    engine, reference = pipeline(True), pipeline(False)
    graphs = engine.compile_state.cuda_graphs
    for height, width in [(64, 64), (64, 64), (48, 80)]:
        torch.testing.assert_close(_images(engine, height, width), _images(reference, height, width), rtol=0, atol=0)
    assert graphs.captures == 2
    # the residuals are inputs, not constants: a new conditioning scale changes the image, as without graphs
    call = dict(prompt="a red fox", height=SIZE, width=SIZE, num_inference_steps=2, max_sequence_length=32,
                output_type="pt", control_image=[_picture(3)] * nets if nets > 1 else _picture(3))  # fmt: skip
    scale = [0.2] * nets if nets > 1 else 0.2
    images = [pipe(**call, generator=torch.Generator().manual_seed(0), controlnet_conditioning_scale=scale).images
              for pipe in (engine, reference)]  # fmt: skip
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=0)
    assert not torch.equal(images[0].float(), _images(engine).float())
    assert graphs.captures == 2


@pytest.mark.parametrize("method", ["enable_layerwise_casting", "enable_group_offload"])
def test_diffusers_hooks_inside_a_compiled_controlnet_are_refused_before_they_are_set(method):
    """Under `compile` the ControlNet's blocks are compiled regions as the transformer's: diffusers' layerwise casting
    and leaf-level group offloading hook modules inside them, and the next call failed inside dynamo. Refused with
    the fix, nothing set (the transformer's own were already); restore() takes the refusal off again."""
    torch._dynamo.reset()
    pipe = _pipeline(EngineConfig(compile=CompileConfig(mode="regional", backend="aot_eager")))
    args = {
        "enable_layerwise_casting": dict(storage_dtype=torch.bfloat16, compute_dtype=torch.float32),
        "enable_group_offload": dict(onload_device=torch.device("cpu"), offload_type="leaf_level"),
    }[method]
    with pytest.raises(ConfigError, match=rf"FluxControlNetModel\.{method}\(\): .* Nothing was done"):
        getattr(pipe.controlnet, method)(**args)
    assert not any(hasattr(module, "_diffusers_hook") for module in pipe.controlnet.modules())
    expected = _images(_pipeline())
    torch.testing.assert_close(_images(pipe), expected, rtol=0, atol=1e-5)
    restore(pipe)
    assert getattr(pipe.controlnet, method).__func__ is getattr(type(pipe.controlnet), method)


@pytest.mark.parametrize("second", ["fused", "fp8"])
def test_a_controlnet_optimised_beside_another_transformer_is_refused(second):
    """One ControlNet in two pipelines over different transformers: optimize() rewrites the ControlNet in place, so
    the first pipeline's images changed without a word (fp8: 1.2e-3 from diffusers against its 1e-5) or the second
    optimize() failed half-way, its transformer's blocks rewritten. Refused before anything changes; once the first
    is restored, the ControlNet is free again."""
    first = _pipeline(FUSED)
    expected = _images(first)
    components = synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=5)
    other = FluxControlNetPipeline(**components, controlnet=first.controlnet)
    other.set_progress_bar_config(disable=True)
    with pytest.raises(ConfigError, match="optimised already, beside another pipeline's transformer"):
        optimize(other, FUSED if second == "fused" else FP8)
    assert isinstance(other.transformer.transformer_blocks[0], FluxTransformerBlock)  # nothing changed
    torch.testing.assert_close(_images(first), expected, atol=0, rtol=0)
    restore(first)
    optimize(other, FUSED)


def test_control_images_that_do_not_pair_with_a_multi_controlnet_are_refused():
    """FluxMultiControlNetModel zips control images, nets and scales: one image failed inside diffusers ("'Image'
    object is not iterable"), a list of another length was cut to the shorter without a word."""
    from diffusers import FluxMultiControlNetModel

    from engine import FluxEngine
    from engine.errors import InputError

    nets = FluxMultiControlNetModel([synthetic_controlnet("tiny", dtype=torch.float32, seed=s) for s in (1, 2)])
    engine = FluxEngine.from_pretrained("synthetic:tiny", "baseline", device="cpu", task="controlnet", controlnet=nets)
    call = dict(prompt="a red fox", height=SIZE, width=SIZE, num_inference_steps=1, max_sequence_length=32)
    bad = {
        "one image": dict(control_image=_picture(3), controlnet_conditioning_scale=[0.7, 0.3]),
        "three images": dict(control_image=[_picture(3)] * 3, controlnet_conditioning_scale=0.5),
        "one scale for two": dict(control_image=[_picture(3), _picture(4)], controlnet_conditioning_scale=[0.7]),
    }
    for arguments in bad.values():
        with pytest.raises(InputError, match="control"):
            engine(**call, **arguments)
    images = engine(**call, control_image=[_picture(3), _picture(4)], controlnet_conditioning_scale=[0.7, 0.3],
                    output_type="pt").images  # fmt: skip
    assert images.isfinite().all()


def test_from_pipe_to_the_controlnet_task_takes_a_controlnet():
    """Before: FluxEngine.from_pipe(pipe, task="controlnet") could not be given a ControlNet (diffusers' TypeError,
    a required argument missing). Now it takes one as from_pretrained does, and makes diffusers' image with it."""
    from engine import FluxEngine

    components = synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)
    net = synthetic_controlnet("tiny", dtype=torch.float32, seed=1)
    expected = _images(FluxControlNetPipeline(**components, controlnet=net))
    engine = FluxEngine(**components)
    with pytest.raises(ConfigError, match="task='controlnet' needs controlnet="):
        FluxEngine.from_pipe(engine, "baseline", task="controlnet")
    with pytest.raises(ConfigError, match="controlnet= is for task='controlnet'"):
        FluxEngine.from_pipe(engine, "baseline", task="img2img", controlnet=net)
    controlled = FluxEngine.from_pipe(engine, "baseline", task="controlnet", controlnet=net)
    assert controlled.controlnet is net and controlled.transformer is engine.transformer
    controlled.set_progress_bar_config(disable=True)
    assert torch.equal(_images(controlled), expected)
    again = type(controlled).from_pipe(controlled, "baseline")  # the ControlNet pipeline's own by default
    assert again.controlnet is net
