"""optimize() on diffusers' other FLUX.1 pipeline classes (img2img, inpaint, Kontext, Fill, Control), against the same
class plain, on the tiny models in fp32 on the CPU (tiny-fill and tiny-control: the tiny transformer with Fill's 384 and
Canny / Depth's 128 input channels): the baseline is diffusers to the bit, the fused blocks within fp32 rounding, fp8
within its own tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    FluxControlPipeline,
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxKontextPipeline,
    FluxPipeline,
)
from PIL import Image

from engine import EngineConfig, FluxEngine, optimize, restore
from engine.config import AttentionConfig, QuantConfig
from engine.errors import ConfigError
from engine.measure import psnr
from engine.models import synthetic_components
from engine.parallel import ParallelConfig
from engine.pipeline import engine_config_of

SIZE = 64
FUSED = EngineConfig(attention=AttentionConfig(backend="auto"))  # the fused blocks in PyTorch (no Triton on a CPU)


def _picture(seed: int, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


CLASSES = {  # task: (class, its inputs, the tiny variant whose transformer it feeds)
    "img2img": (FluxImg2ImgPipeline, lambda: {"image": _picture(1), "strength": 0.6}, "tiny"),
    "inpaint": (
        FluxInpaintPipeline,
        lambda: {"image": _picture(1), "mask_image": _picture(2, "L"), "strength": 0.8},
        "tiny",
    ),  # fmt: skip
    "kontext": (FluxKontextPipeline, lambda: {"image": _picture(1), "_auto_resize": False}, "tiny"),
    "fill": (FluxFillPipeline, lambda: {"image": _picture(1), "mask_image": _picture(2, "L")}, "tiny-fill"),
    "control": (FluxControlPipeline, lambda: {"control_image": _picture(3)}, "tiny-control"),
}
FP8 = EngineConfig(attention=AttentionConfig(backend="auto"), quant=QuantConfig(transformer="fp8"))


def _images(pipeline_class, inputs: dict, config=None, variant: str = "tiny") -> torch.Tensor:
    pipe = pipeline_class(**synthetic_components(variant, device="cpu", dtype=torch.float32, seed=0))
    if config is not None:
        assert optimize(pipe, config) is pipe
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a red fox", height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=3.5,
                generator=torch.Generator().manual_seed(0), max_sequence_length=32, output_type="pt")  # fmt: skip
    return pipe(**call, **inputs).images.float()


@pytest.mark.parametrize("task", list(CLASSES))
def test_other_flux_pipelines_keep_their_call_and_diffusers_images(task):
    pipeline_class, inputs, variant = CLASSES[task]
    plain = _images(pipeline_class, inputs(), variant=variant)
    assert torch.equal(_images(pipeline_class, inputs(), "baseline", variant), plain)
    # the fused QKV GEMMs sum in another order than three GEMMs: fp32 rounding (0.0 to ~1e-6 on text-to-image,
    # tests/test_engine_attention.py)
    torch.testing.assert_close(_images(pipeline_class, inputs(), FUSED, variant), plain, atol=1e-5, rtol=0)
    # fp8 within its text-to-image tolerance (tests/test_quantize.py: 45 dB); measured 61-63 dB on Fill and Control
    assert psnr(_images(pipeline_class, inputs(), FP8, variant), plain) >= 45.0


@pytest.mark.parametrize(
    ("pipeline_class", "variant", "fits"),
    [(FluxPipeline, "tiny-fill", "FluxFillPipeline"), (FluxFillPipeline, "tiny", "FluxPipeline"),
     (FluxPipeline, "tiny-control", "FluxControlPipeline"), (FluxControlPipeline, "tiny-fill", "FluxFillPipeline")],
)  # fmt: skip
def test_a_model_in_the_wrong_pipeline_class_is_refused_up_front(pipeline_class, variant, fits):
    """diffusers would denoise latents of the wrong width and fail in the VAE after every step; the engine names the
    class that fits before anything runs (FluxEngine included: it is a FluxPipeline)."""
    pipe = pipeline_class(**synthetic_components(variant, device="cpu", dtype=torch.float32, seed=0))
    with pytest.raises(ConfigError, match=f"feeds its transformer .* latent channels.*into {fits}"):
        optimize(pipe, FUSED)
    if pipeline_class is FluxPipeline:
        with pytest.raises(ConfigError, match=f"into {fits}"):
            FluxEngine.from_pretrained(f"synthetic:{variant}", device="cpu")


def test_pipelines_without_a_flux_transformer_are_refused():
    components = synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)
    pipe = FluxPipeline(**components)
    pipe.transformer = None
    with pytest.raises(ConfigError, match="FluxTransformer2DModel.*FluxPriorReduxPipeline"):
        optimize(pipe, FUSED)


def test_parallel_runs_text_to_image_only_for_now():
    pipe = FluxImg2ImgPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0))
    with pytest.raises(ConfigError, match="parallel config runs text-to-image.*FluxImg2ImgPipeline"):
        optimize(pipe, EngineConfig(attention=AttentionConfig(backend="auto"), parallel=ParallelConfig(ulysses=2)))


def _call(pipe, inputs: dict | None = None) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a red fox", height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=3.5,
                generator=torch.Generator().manual_seed(0), max_sequence_length=32, output_type="pt")  # fmt: skip
    return pipe(**call, **(inputs or {})).images.float()


@pytest.mark.parametrize("config", [FUSED, FP8], ids=["fused", "fp8"])
def test_a_pipeline_from_pipe_over_an_optimised_transformer_shares_its_config(config):
    """diffusers' from_pipe (or a pipeline given another's components) over a transformer that optimize() rewrote:
    optimize() with the same config shares the first one's work (fp8 failed inside the fusing of parts that were
    quantised away), and the images are those of a pipeline optimised on its own."""
    kontext = FluxKontextPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0))
    optimize(kontext, config)
    inputs = CLASSES["kontext"][1]()
    before = _call(kontext, inputs)
    text_to_image = FluxPipeline.from_pipe(kontext)
    assert optimize(text_to_image, config) is text_to_image
    alone = optimize(FluxPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)), config)
    assert torch.equal(_call(text_to_image), _call(alone))
    assert torch.equal(_call(kontext, inputs), before)


def test_another_config_on_a_shared_optimised_transformer_is_refused_and_changes_nothing():
    """fused, then fp8 through a from_pipe pipeline: the shared transformer was quantised under the first pipeline
    without a word (its images then fp8's, and restore() failed half-way). Refused now, before anything changes."""
    kontext = FluxKontextPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0))
    optimize(kontext, FUSED)
    inputs = CLASSES["kontext"][1]()
    before = _call(kontext, inputs)
    with pytest.raises(ConfigError, match="already optimised with .*load a fresh pipeline"):
        optimize(FluxPipeline.from_pipe(kontext), FP8)
    assert torch.equal(_call(kontext, inputs), before)
    restore(kontext)  # the shared transformer is diffusers' own again: another config may go on it
    assert engine_config_of(optimize(FluxPipeline.from_pipe(kontext), FP8)) == FP8


def test_a_controlnet_pipeline_from_pipe_gets_its_controlnet_optimised():
    """FluxControlNetPipeline.from_pipe(optimised pipeline, controlnet=new one): the new ControlNet gets the config's
    blocks and quantisation, as it would in a pipeline optimised on its own, with the same images."""
    from diffusers import FluxControlNetPipeline

    from engine.attention import EngineDoubleBlock
    from engine.models import synthetic_controlnet

    control = {"control_image": _picture(3), "controlnet_conditioning_scale": 0.7}
    first = optimize(FluxPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)), FP8)
    net = synthetic_controlnet("tiny", dtype=torch.float32, seed=1)
    shared = FluxControlNetPipeline.from_pipe(first, controlnet=net)
    optimize(shared, FP8)
    assert isinstance(shared.controlnet.transformer_blocks[0], EngineDoubleBlock)
    alone = FluxControlNetPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0),
                                   controlnet=synthetic_controlnet("tiny", dtype=torch.float32, seed=1))  # fmt: skip
    assert torch.equal(_call(shared, control), _call(optimize(alone, FP8), control))


def test_what_a_pipeline_reports_is_what_its_shared_transformer_runs():
    """Pipelines over one transformer report (engine_config_of) and share its state: a restore through one is seen by
    the other (it claimed fused over plain blocks, and a second optimize() then returned at once, leaving them plain),
    and a pipeline that claimed 'baseline' takes the config another one applied since (it stacked the steps again:
    fp8's failed, fused ones went into a list of its own)."""
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    from engine.attention import EngineDoubleBlock

    first = optimize(FluxPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)), FUSED)
    second = optimize(FluxPipeline.from_pipe(first), FUSED)
    restore(second)
    assert engine_config_of(first) is None
    assert type(first.transformer.transformer_blocks[0]) is FluxTransformerBlock
    optimize(first, FUSED)
    assert isinstance(first.transformer.transformer_blocks[0], EngineDoubleBlock)
    assert engine_config_of(second) == FUSED

    components = synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)
    plain = optimize(FluxPipeline(**components), "baseline")
    quantised = optimize(FluxPipeline.from_pipe(plain), FP8)
    assert engine_config_of(plain) == FP8
    assert optimize(plain, FP8) is plain and plain.engine_steps is quantised.engine_steps
    assert torch.equal(_call(plain), _call(quantised))


def test_a_pipeline_over_a_shared_transformer_but_another_vae_is_refused_where_the_vae_had_steps():
    """The VAE's steps (tiling) went with the first pipeline's VAE: a pipeline with its own VAE would claim them. A
    config that leaves the transformer alone (tiled-vae) records nothing on it: the other VAE takes its own steps."""
    from engine.config import PRESETS

    config = EngineConfig(attention=AttentionConfig(backend="auto"), vae=PRESETS["tiled-vae"].vae)
    first = optimize(FluxPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)), config)
    other_vae = synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=1)["vae"]
    with pytest.raises(ConfigError, match="but not the VAE that config's steps went with"):
        optimize(FluxPipeline(**{**first.components, "vae": other_vae}), config)
    tiled = optimize(FluxPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)),
                     "tiled-vae")  # fmt: skip
    own = optimize(FluxPipeline(**{**tiled.components, "vae": other_vae}), "tiled-vae")
    assert own.vae_state is not None and own.vae_state is not tiled.vae_state
