import inspect
import logging
import re

import pytest
import torch
from conftest import TINY_SIZE, tiny_call_kwargs
from diffusers import FluxPipeline

from engine import EngineConfig, FluxEngine, optimize
from engine.errors import ConfigError, InputError
from engine.pipeline import engine_config_of


@pytest.fixture(scope="module")
def baseline_images(tiny_components):
    return FluxPipeline(**tiny_components)(**tiny_call_kwargs()).images


def test_baseline_preset_returns_exactly_diffusers_images(tiny_components, baseline_images):
    engine = FluxEngine.from_pipe(FluxPipeline(**tiny_components), "baseline")
    images = engine(**tiny_call_kwargs()).images
    assert images.shape == (1, 3, TINY_SIZE, TINY_SIZE)
    assert torch.equal(images, baseline_images)


def test_optimize_in_place_keeps_diffusers_outputs(tiny_components, baseline_images):
    pipe = FluxPipeline(**tiny_components)
    assert optimize(pipe, EngineConfig()) is pipe
    assert engine_config_of(pipe).is_baseline
    assert torch.equal(pipe(**tiny_call_kwargs()).images, baseline_images)


def test_from_pretrained_synthetic_variant_matches_components_of_the_same_seed(baseline_images):
    engine = FluxEngine.from_pretrained("synthetic:tiny", device="cpu", dtype=torch.float32, seed=0)
    assert isinstance(engine, FluxPipeline)
    assert engine.engine_config.is_baseline
    assert engine.model_name == "synthetic:tiny"
    assert torch.equal(engine(**tiny_call_kwargs()).images, baseline_images)


def test_from_pretrained_accepts_diffusers_torch_dtype_spelling():
    engine = FluxEngine.from_pretrained("synthetic:tiny", device="cpu", torch_dtype=torch.bfloat16)
    assert engine.transformer.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="disagree"):
        FluxEngine.from_pretrained("synthetic:tiny", device="cpu", dtype=torch.float32, torch_dtype=torch.float16)


def test_from_pretrained_loads_a_local_folder(tmp_path, tiny_components, baseline_images):
    FluxPipeline(**tiny_components).save_pretrained(tmp_path / "model")
    engine = FluxEngine.from_pretrained(tmp_path / "model", device="cpu", dtype=torch.float32)
    # The loaded weights are bitwise equal (test_models), but live in other (mmap-backed) memory, and
    # the CPU BLAS picks kernels by alignment: measured output differences up to 9e-7 in fp32.
    torch.testing.assert_close(engine(**tiny_call_kwargs()).images, baseline_images, rtol=0, atol=1e-5)


@pytest.mark.parametrize("task", ["text-to-image", "kontext"])
def test_a_folder_saved_from_an_engine_loads_in_diffusers(tmp_path, task):
    """FluxEngine.save_pretrained wrote `_class_name: FluxEngine`, which diffusers' DiffusionPipeline.from_pretrained
    looks up in diffusers and fails on; the folder now names the diffusers class, and both load it with the same
    weights (the fused config: its save writes diffusers' keys)."""
    from diffusers import DiffusionPipeline

    from engine.config import AttentionConfig
    from engine.models import synthetic_components

    fused = EngineConfig(attention=AttentionConfig(backend="auto"))
    engine = FluxEngine.from_pretrained("synthetic:tiny", fused, device="cpu", dtype=torch.float32, task=task)
    engine.save_pretrained(tmp_path / "model")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "model")
    diffusers_class = next(c for c in type(engine).__mro__ if c.__module__.startswith("diffusers."))
    assert type(loaded) is diffusers_class  # FluxPipeline / FluxKontextPipeline
    expected = synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)["transformer"].state_dict()
    state = loaded.transformer.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[key], expected[key]) for key in expected)
    again = FluxEngine.from_pretrained(tmp_path / "model", device="cpu", dtype=torch.float32, task=task)
    assert type(again) is type(engine)


def test_call_signature_is_flux_pipelines():
    ours = inspect.signature(FluxEngine.__call__)
    theirs = inspect.signature(FluxPipeline.__call__)
    assert list(ours.parameters) == list(theirs.parameters)
    for name in (
        "prompt",
        "prompt_2",
        "height",
        "width",
        "num_inference_steps",
        "guidance_scale",
        "generator",
        "latents",
        "prompt_embeds",
        "pooled_prompt_embeds",
        "output_type",
        "return_dict",
        "max_sequence_length",
        "callback_on_step_end",
        "joint_attention_kwargs",
    ):
        assert ours.parameters[name].default == theirs.parameters[name].default, name


def test_positional_prompt_and_pil_output(tiny_components):
    engine = FluxEngine.from_pipe(FluxPipeline(**tiny_components))
    out = engine("a fox", height=TINY_SIZE, width=96, num_inference_steps=1, max_sequence_length=16)
    assert out.images[0].size == (96, TINY_SIZE)
    images, *_ = engine("a fox", height=TINY_SIZE, width=TINY_SIZE, num_inference_steps=1, return_dict=False)
    assert len(images) == 1


def test_prompt_embeds_and_latents_are_used_as_given(tiny_components, baseline_images):
    engine = FluxEngine.from_pipe(FluxPipeline(**tiny_components))
    prompt_embeds, pooled, _ = engine.encode_prompt("a red fox in the snow", None, max_sequence_length=32)
    kwargs = tiny_call_kwargs(prompt=None, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled)
    assert torch.equal(engine(**kwargs).images, baseline_images)


@pytest.fixture(scope="module")
def engine(tiny_components):
    return FluxEngine.from_pipe(FluxPipeline(**tiny_components))


@pytest.mark.parametrize("steps", [0, -3])
def test_zero_steps_is_a_clear_error(engine, steps):
    with pytest.raises(InputError, match=f"num_inference_steps={steps} must be an integer >= 1"):
        engine(**tiny_call_kwargs(num_inference_steps=steps))


def test_too_small_image_is_a_clear_error(engine):
    with pytest.raises(InputError, match="height=8 is below the smallest image of 16 pixels"):
        engine(**tiny_call_kwargs(height=8))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"height": "abc"}, "height='abc' is not a whole number of pixels; pass an int that is a multiple of 16"),
        ({"width": 64.5}, "width=64.5 is not a whole number of pixels"),
        ({"height": True}, "height=True is not a whole number of pixels"),
        ({"guidance_scale": float("nan")}, "guidance_scale=nan must be a finite number"),
        ({"guidance_scale": float("inf")}, "guidance_scale=inf must be a finite number"),
        ({"guidance_scale": "3.5"}, "guidance_scale='3.5' must be a finite number"),
        ({"true_cfg_scale": float("nan")}, "true_cfg_scale=nan must be a finite number"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt=0 must be an integer >= 1"),
        ({"num_inference_steps": 2.5}, "num_inference_steps=2.5 must be an integer >= 1"),
        ({"num_inference_steps": 2.0}, "num_inference_steps=2.0 must be an integer >= 1"),  # diffusers: TypeError
        ({"num_images_per_prompt": 1.0}, "num_images_per_prompt=1.0 must be an integer >= 1"),
        ({"guidance_scale": None}, "guidance_scale=None must be a finite number"),  # dev takes a guidance input
        ({"guidance_scale": torch.tensor([3.5, 1.0])}, "must be a finite number"),
    ],
)
def test_bad_call_arguments_are_refused_before_any_step(engine, bad, message):
    steps = []
    hook = engine.transformer.register_forward_pre_hook(lambda module, args: steps.append(1))
    try:
        with pytest.raises(InputError, match=re.escape(message)):
            engine(**tiny_call_kwargs(**bad))
    finally:
        hook.remove()
    assert steps == []  # diffusers would have made a NaN image, or failed deep inside the model


def test_what_diffusers_accepts_works_the_same(engine):
    # diffusers takes whole float sizes (Python's or NumPy's), NumPy ints, an int or a tensor guidance; so must a
    # drop-in, with the same image as the plain Python values give
    import numpy as np

    pairs = [
        ({"height": float(TINY_SIZE), "width": np.float32(TINY_SIZE)}, {}),
        ({"height": np.int64(TINY_SIZE), "num_inference_steps": np.int64(2)}, {}),
        ({"guidance_scale": torch.tensor(3.5)}, {"guidance_scale": 3.5}),
        ({"guidance_scale": 3}, {"guidance_scale": 3.0}),
    ]
    for given, plain in pairs:
        images = engine(**tiny_call_kwargs(**given)).images
        assert torch.equal(images, engine(**tiny_call_kwargs(**plain)).images), given


def test_latents_of_the_wrong_shape_are_a_clear_error(engine):
    latents = torch.randn(1, 4, 4, 64)
    with pytest.raises(InputError, match=r"latents have shape \(1, 4, 4, 64\).*\(batch, 16, 64\)"):
        engine(**tiny_call_kwargs(latents=latents))


def test_prompt_embeds_of_another_model_are_a_clear_error(engine):
    with pytest.raises(InputError, match="prompt_embeds has last dimension 4096, this transformer takes 32"):
        engine(
            **tiny_call_kwargs(
                prompt=None, prompt_embeds=torch.randn(1, 32, 4096), pooled_prompt_embeds=torch.randn(1, 32)
            )
        )


def test_long_prompt_warns_and_truncates_as_diffusers_does(engine):
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect()
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(handler)
    try:
        long_prompt = " ".join(["lighthouse"] * 120)
        engine(**tiny_call_kwargs(prompt=long_prompt, num_inference_steps=1))
    finally:
        diffusers_logger.removeHandler(handler)
    assert any("truncated" in message for message in records)


def test_optimizing_twice_with_different_configs_is_refused():
    from engine.config import AttentionConfig, CacheConfig

    pipe = FluxPipeline(**synthetic_components_copy())  # its modules are rewritten below
    optimize(pipe, "baseline")
    optimize(pipe, "baseline")  # the same config again is a no-op
    cached = EngineConfig(cache=CacheConfig(directory="/tmp/flux-cache"))
    optimize(pipe, cached)  # a baseline pipeline may still take a config
    optimize(pipe, "baseline")  # and one whose steps changed no module leaves nothing to stack on
    fused = EngineConfig(attention=AttentionConfig(backend="auto"))
    optimize(pipe, fused)
    with pytest.raises(ConfigError, match="already optimised"):
        optimize(pipe, "baseline")


def test_optimize_takes_only_flux_pipelines():
    with pytest.raises(ConfigError, match="takes a diffusers FLUX.1 pipeline .*; got str with no transformer"):
        optimize("not a pipeline", "baseline")


def test_a_transformer_wrapped_by_torch_compile_is_named_with_its_fixes():
    """Before: `pipe.transformer = torch.compile(pipe.transformer)` then optimize() was told to look at
    FluxPriorReduxPipeline; the fixes are the unwrapped transformer or compiling after optimize()."""
    from engine.models import synthetic_components

    pipe = FluxPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32))
    transformer = pipe.transformer
    pipe.transformer = torch.compile(transformer)
    with pytest.raises(ConfigError, match=r"OptimizedModule.*Nothing was changed.*_orig_mod.*\.compile\(\)"):
        optimize(pipe, "baseline")
    pipe.transformer = transformer
    optimize(pipe, "baseline")


def test_from_pipe_of_an_optimised_pipeline_refuses_a_second_config():
    from engine.config import AttentionConfig, CacheConfig

    components = synthetic_components_copy()
    config = EngineConfig(attention=AttentionConfig(backend="auto"), cache=CacheConfig(directory="/tmp/x"))
    first = FluxEngine.from_pipe(FluxPipeline(**components), config)
    again = FluxEngine.from_pipe(first, first.engine_config)  # the same config: fine, nothing redone
    assert again.engine_config == first.engine_config
    with pytest.raises(ConfigError, match="already optimised"):
        FluxEngine.from_pipe(first, "baseline")


def synthetic_components_copy():
    from engine.models import synthetic_components

    return synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    message = r"device 'cuda' asks for a CUDA GPU, but torch .* sees none; use device 'cpu'"
    with pytest.raises(ConfigError, match=message):
        FluxEngine.from_pretrained("synthetic:tiny", device="cuda")


@pytest.mark.parametrize(
    ("device", "message"),
    [("gpu", "device 'gpu' is not a device name; use 'cuda', 'cuda:1' or 'cpu'"), ("meta", "runs on cuda or cpu")],
)
def test_unknown_devices_are_a_clear_error(device, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        FluxEngine.from_pretrained("synthetic:tiny", device=device)
