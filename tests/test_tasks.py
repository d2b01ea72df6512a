"""The engines of the FLUX.1 tasks (`FluxEngine.from_pretrained(..., task=...)`), their local loading, and the checks
of a call's images, masks and strength; on the tiny models in fp32 on the CPU, against diffusers' own classes."""

from __future__ import annotations

import re

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from engine import ENGINES, TASKS, EngineConfig, FluxEngine, FluxFillEngine, FluxKontextEngine
from engine.config import AttentionConfig
from engine.errors import CheckpointError, ConfigError, InputError
from engine.models import save_bfl_single_file, synthetic_components
from engine.tasks import synthetic_inputs

SIZE = 64
FUSED = EngineConfig(attention=AttentionConfig(backend="auto"))
TINY_OF = {64: "tiny", 384: "tiny-fill", 128: "tiny-control"}


def _picture(seed: int, mode: str = "RGB", size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


INPUTS = {  # task: what its call takes beside the prompt
    "text-to-image": {},
    "img2img": {"image": _picture(1), "strength": 0.6},
    "inpaint": {"image": _picture(1), "mask_image": _picture(2, "L"), "strength": 0.8},
    "kontext": {"image": _picture(1), "_auto_resize": False, "max_area": SIZE * SIZE},
    "kontext-inpaint": {
        "image": _picture(1),
        "mask_image": _picture(2, "L"),
        "_auto_resize": False,
        "max_area": SIZE * SIZE,
        "strength": 0.8,
    },  # fmt: skip
    "fill": {"image": _picture(1), "mask_image": _picture(2, "L")},
    "control": {"control_image": _picture(3)},
    "control-img2img": {"control_image": _picture(3), "image": _picture(1), "strength": 0.6},
    "control-inpaint": {"control_image": _picture(3), "image": _picture(1), "mask_image": _picture(2, "L")},
}


def _call(pipe, **inputs) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a red fox", height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=3.5,
                generator=torch.Generator().manual_seed(0), max_sequence_length=32, output_type="pt")  # fmt: skip
    return pipe(**{**call, **inputs}).images.float()


def test_every_task_has_its_engine_on_its_diffusers_class():
    assert set(ENGINES) == set(TASKS)
    for task, engine in ENGINES.items():
        assert issubclass(engine, getattr(diffusers, TASKS[task].pipeline_class)) and engine.task == task
    assert ENGINES["text-to-image"] is FluxEngine


@pytest.mark.parametrize("task", list(INPUTS))
def test_from_pretrained_task_returns_that_engine_with_diffusers_images(task):
    """The engine of each task makes the images of its diffusers class: to the bit under `baseline`, within fp32
    rounding with the fused blocks (tests/test_pipeline_classes.py: 1e-5)."""
    pipeline_class = getattr(diffusers, TASKS[task].pipeline_class)
    variant = TINY_OF[TASKS[task].channels]
    plain = _call(pipeline_class(**synthetic_components(variant, device="cpu", dtype=torch.float32)), **INPUTS[task])
    engine = FluxEngine.from_pretrained(f"synthetic:{variant}", "baseline", device="cpu", task=task)
    assert type(engine) is ENGINES[task] and isinstance(engine, pipeline_class)
    assert torch.equal(_call(engine, **INPUTS[task]), plain)
    fused = ENGINES[task].from_pretrained(f"synthetic:{variant}", FUSED, device="cpu")
    assert type(fused) is ENGINES[task] and fused.attention_ops is not None
    torch.testing.assert_close(_call(fused, **INPUTS[task]), plain, atol=1e-5, rtol=0)


def test_from_pipe_makes_another_task_over_the_same_components():
    t2i = FluxEngine.from_pretrained("synthetic:tiny", FUSED, device="cpu")
    kontext = FluxEngine.from_pipe(t2i, FUSED, task="kontext")
    assert type(kontext) is FluxKontextEngine and kontext.transformer is t2i.transformer
    plain = diffusers.FluxKontextPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32))
    torch.testing.assert_close(
        _call(kontext, **INPUTS["kontext"]), _call(plain, **INPUTS["kontext"]), atol=1e-5, rtol=0
    )


def test_bad_tasks_are_refused_naming_the_fix():
    with pytest.raises(ConfigError, match="task='upscale' is not a FLUX.1 task; pick one of 'text-to-image'"):
        FluxEngine.from_pretrained("synthetic:tiny", device="cpu", task="upscale")
    with pytest.raises(ConfigError, match=r"FluxFillEngine runs task 'fill', not 'kontext'.*task='kontext'"):
        FluxFillEngine.from_pretrained("synthetic:tiny-fill", device="cpu", task="kontext")
    with pytest.raises(ConfigError, match=r"takes 384 \(FLUX.1 Fill model\).*task='fill'.*FluxFillPipeline"):
        FluxEngine.from_pretrained("synthetic:tiny-fill", device="cpu", task="img2img")
    with pytest.raises(ConfigError, match="task='controlnet' needs controlnet=: a FluxControlNetModel"):
        FluxEngine.from_pretrained("synthetic:tiny", device="cpu", task="controlnet")
    with pytest.raises(ConfigError, match="controlnet= is for task='controlnet'"):
        FluxEngine.from_pretrained("synthetic:tiny", device="cpu", controlnet=torch.nn.Linear(1, 1))


def test_fill_single_file_loads_beside_a_dev_folder(tmp_path):
    """BFL ships Fill (and Canny / Depth) as one transformer file; users keep a dev folder for the rest. The file's
    input width (384) wins over the folder's config (64), and the engine makes the Fill model's images."""
    dev = tmp_path / "dev"
    diffusers.FluxPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)).save_pretrained(
        dev
    )
    fill = synthetic_components("tiny-fill", device="cpu", dtype=torch.float32, seed=0)
    path = save_bfl_single_file(fill["transformer"], tmp_path / "flux1-fill-tiny.safetensors")
    engine = FluxEngine.from_pretrained(path, "baseline", device="cpu", config_folder=dev, task="fill")
    assert type(engine) is FluxFillEngine and engine.transformer.config.in_channels == 384
    for name, tensor in fill["transformer"].state_dict().items():
        assert torch.equal(engine.transformer.state_dict()[name], tensor), name
    with pytest.raises(ConfigError, match="task='fill'"):  # the same file as a text-to-image model: refused
        FluxEngine.from_pretrained(path, "baseline", device="cpu", config_folder=dev)
    folder = tmp_path / "fill"
    diffusers.FluxFillPipeline(**fill).save_pretrained(folder)
    loaded = FluxEngine.from_pretrained(folder, FUSED, device="cpu", task="fill")
    plain = _call(diffusers.FluxFillPipeline(**fill), **INPUTS["fill"])
    torch.testing.assert_close(_call(loaded, **INPUTS["fill"]), plain, atol=1e-5, rtol=0)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        FluxEngine.from_pretrained(path, device="cpu", config_folder=dev, task="fill")


@pytest.fixture(scope="module")
def engines():
    tasks = ("img2img", "inpaint", "kontext", "fill")
    variants = {task: f"synthetic:{TINY_OF[TASKS[task].channels]}" for task in tasks}
    return {task: FluxEngine.from_pretrained(variants[task], FUSED, device="cpu", task=task) for task in tasks}


BAD_INPUTS = [
    ("img2img", {"image": None}, r"task 'img2img' \(FluxImg2ImgPipeline\) needs image=: a PIL image in RGB"),
    ("img2img", {"image": _picture(1, "RGBA")}, r"image has PIL mode 'RGBA'.*image.convert\('RGB'\)"),
    ("kontext", {"image": _picture(1, "L")}, r"image has PIL mode 'L'"),
    ("kontext", {"image": _picture(1, size=(8, 8))}, "image is 8x8 pixels; each side must be at least 16"),
    ("img2img", {"image": torch.rand(1, 4, SIZE, SIZE)}, r"image has shape \(1, 4, 64, 64\); pass an RGB image"),
    ("img2img", {"image": "fox.png"}, "image is a str; pass a PIL image"),
    ("inpaint", {"mask_image": _picture(2, "L", (SIZE, 48))}, r"mask_image is 64x48 but image is 64x64.*mask.resize"),
    ("fill", {"mask_image": None}, r"task 'fill' \(FluxFillPipeline\) needs mask_image=: a PIL image \(any mode"),
    ("img2img", {"strength": 1.5}, r"strength=1.5 must be a number in \[0, 1\]"),
    ("inpaint", {"strength": float("nan")}, r"strength=nan must be a number in \[0, 1\]"),
    ("img2img", {"strength": 0.0}, "strength=0 leaves none of the 2 steps to denoise.*strength above 0"),
    ("fill", {"strength": -0.1}, r"strength=-0.1 must be a number in \[0, 1\]"),
]


@pytest.mark.parametrize(("task", "change", "message"), BAD_INPUTS)
def test_bad_images_masks_and_strength_are_refused_before_anything_runs(engines, task, change, message):
    engine = engines[task]
    steps = []
    hook = engine.transformer.register_forward_pre_hook(lambda *_: steps.append(1))
    try:
        with pytest.raises(InputError, match=message):
            _call(engine, **{**INPUTS[task], **change})
    finally:
        hook.remove()
    assert not steps


def test_inputs_diffusers_takes_still_pass(engines):
    """Masks in any mode (diffusers makes them grayscale), tensors in [0, 1], and images of another size than the
    output (diffusers resizes them) are not refused."""
    engine = engines["inpaint"]
    images = _call(engine, image=torch.rand(1, 3, 96, 96), mask_image=_picture(2, "RGB", (96, 96)), strength=0.8)
    assert images.shape == (1, 3, SIZE, SIZE)
    images = _call(engines["img2img"], image=[_picture(1, size=(128, 96))], strength=0.6)
    assert images.shape == (1, 3, SIZE, SIZE)


# ----------------------------------------------------------------------------- engine.bench / engine.generate --task


@pytest.mark.parametrize("task", ["fill", "control-inpaint"])
def test_bench_task_runs_diffusers_class_beside_the_engine(task, tmp_path, capsys):
    """engine.bench --task: the tiny variant of the task's architecture, diffusers' class of the task as the baseline
    with the same synthetic inputs (the baseline preset: equal to the bit, an 'inf' PSNR), the task in the JSON."""
    import json

    from engine.bench import cli

    out = tmp_path / "task.json"
    argv = ["--task", task, "--res", "64", "--steps", "2", "--preset", "baseline", "--device", "cpu"]
    assert cli.main([*argv, "--allow-any-size", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == task and result["model"] == "synthetic:" + TASKS[task].tiny
    rows = {row["config"]: row for row in result["rows"]}
    assert rows["baseline"]["psnr_db"] == "inf"
    assert f"vs diffusers ({task})" in capsys.readouterr().out


def test_kontext_flops_count_its_input_picture():
    from engine.bench.phases import transformer_step_flops
    from engine.models.variants import variant_spec
    from engine.tasks import condition_tokens

    assert condition_tokens("kontext", 1024, 1024) == 4096 and condition_tokens("fill", 1024, 1024) == 0
    config = variant_spec("flux-dev").transformer
    plain = transformer_step_flops(config, 1024, 1024, 512)
    kontext = transformer_step_flops(config, 1024, 1024, 512, condition_tokens=4096)
    assert 1.9 < kontext / plain < 2.3  # 8704 tokens against 4608: linear layers ~1.9x, attention ~3.6x


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--task", "fill", "--model", "synthetic:tiny", "--image", "in.png", "--mask", "in.png"],
            "task 'fill' .* 384 channels.*synthetic:tiny-fill",
        ),  # fmt: skip
        (["--task", "img2img"], "--task img2img needs --image PATH"),
        (["--task", "kontext", "--mask", "m.png"], "--task kontext takes no --mask"),
        (["--task", "text-to-image", "--strength", "0.5"], "--strength is for img2img"),
        (["--task", "img2img", "--image", "missing.png"], "--image 'missing.png' is not a readable image file"),
    ],
)
def test_generate_task_refuses_bad_arguments(argv, message, capsys, tmp_path, monkeypatch):
    from engine import generate

    monkeypatch.chdir(tmp_path)
    _picture(1).save("in.png")
    assert generate.main(["a fox", "--res", "64", "--device", "cpu", "-o", "out.png", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_generate_edits_an_image_file(tmp_path):
    """engine.generate --task inpaint --image --mask: diffusers' FluxInpaintPipeline image of those files."""
    from engine import generate

    _picture(1, size=(96, 64)).save(tmp_path / "in.png")
    _picture(2, "L", (96, 64)).save(tmp_path / "mask.png")
    argv = ["a fox", "--res", "96x64", "--steps", "2", "--device", "cpu", "--task", "inpaint", "--strength", "0.8"]
    files = ["--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "-o", str(tmp_path / "o.png")]
    assert generate.main([*argv, *files]) == 0
    written = np.asarray(Image.open(tmp_path / "o.png"))
    plain = diffusers.FluxInpaintPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32))
    plain.set_progress_bar_config(disable=True)
    expected = plain(
        "a fox", image=Image.open(tmp_path / "in.png"), mask_image=Image.open(tmp_path / "mask.png"), strength=0.8,
        height=64, width=96, num_inference_steps=2, guidance_scale=3.5,
        max_sequence_length=min(512, plain.tokenizer_2.model_max_length),
        generator=torch.Generator().manual_seed(0),
    ).images[0]  # fmt: skip
    assert written.shape == (64, 96, 3) and np.array_equal(written, np.asarray(expected))


def test_generate_edits_an_image_with_kontext_at_the_asked_size(tmp_path):
    """engine.generate --task kontext --image: diffusers' FluxKontextPipeline image of that file, at --res (the prompt
    went into Kontext's first parameter, `image`, and failed; diffusers' default max_area made 1248x832 of 96x64)."""
    from engine import generate

    _picture(1, size=(96, 64)).save(tmp_path / "in.png")
    argv = ["make it snow", "--res", "96x64", "--steps", "2", "--device", "cpu", "--task", "kontext"]
    assert generate.main([*argv, "--image", str(tmp_path / "in.png"), "-o", str(tmp_path / "o.png")]) == 0
    written = np.asarray(Image.open(tmp_path / "o.png"))
    plain = diffusers.FluxKontextPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32))
    plain.set_progress_bar_config(disable=True)
    expected = plain(
        prompt="make it snow", image=Image.open(tmp_path / "in.png"), height=64, width=96, max_area=64 * 96,
        num_inference_steps=2, guidance_scale=3.5, max_sequence_length=min(512, plain.tokenizer_2.model_max_length),
        generator=torch.Generator().manual_seed(0),
    ).images[0]  # fmt: skip
    assert written.shape == (64, 96, 3) and np.array_equal(written, np.asarray(expected))


def test_the_planner_counts_kontexts_tokens_and_the_image_encode():
    """Kontext's step covers 8704 tokens at 1024^2 (4608 for text-to-image): more time and activations; a task with
    an input image holds the VAE encoder's activations in its encode phase, at the output's size."""
    from engine.config import PRESETS
    from engine.memory.planner import predict, vae_config
    from engine.memory.vae_peaks import decode_peak_bytes, encode_peak_bytes

    config = PRESETS["fp8"]
    t2i, kontext, img2img = (predict(config, "flux-dev", 2048, 2048, task=task) for task in ("text-to-image",
                             "kontext", "img2img"))  # fmt: skip
    assert kontext.parts["denoise"] > t2i.parts["denoise"] and kontext.seconds_per_image > t2i.seconds_per_image
    assert img2img.parts["denoise"] == t2i.parts["denoise"]
    resident = t2i.parts["decode"] - decode_peak_bytes(vae_config("flux-dev"), 2048, 2048, 1, 2, config.vae)
    encoder = encode_peak_bytes(vae_config("flux-dev"), 2048, 2048, 1, 2, config.vae)
    assert encoder > 2**30 and img2img.parts["encode"] == max(t2i.parts["encode"], resident + encoder)


def _kontext_after_text_to_image(config, device: str, dtype: torch.dtype):
    """A text-to-image call, then Kontext over the same components (FluxEngine.from_pipe) at the same size: the
    Kontext call doubles the image tokens; under compile it must reuse the graphs (a recompile is an error here).
    Returns the Kontext images and the plain FluxKontextPipeline's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    t2i = FluxEngine.from_pretrained("synthetic:tiny", config, device=device, dtype=dtype)
    _call(t2i)
    graphs = counters["stats"]["unique_graphs"]
    kontext = FluxEngine.from_pipe(t2i, config, task="kontext")
    with torch._dynamo.config.patch(error_on_recompile=True):
        images = _call(kontext, **INPUTS["kontext"])
        _call(t2i, height=96)  # and back to text-to-image at another size
    assert counters["stats"]["unique_graphs"] == graphs
    plain = diffusers.FluxKontextPipeline(**synthetic_components("tiny", device=device, dtype=dtype))
    return images, _call(plain, **INPUTS["kontext"])


def test_a_kontext_call_after_text_to_image_compiles_nothing_new():
    from engine.config import CompileConfig

    config = EngineConfig(compile=CompileConfig(mode="regional", backend="aot_eager"))
    images, plain = _kontext_after_text_to_image(config, "cpu", torch.float32)
    torch.testing.assert_close(images, plain, atol=1e-5, rtol=0)  # aot_eager: eager up to fp32 rounding


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="our kernels, fp8 and CUDA graphs need CUDA")
def test_kontext_after_text_to_image_on_the_fastest_preset_on_the_gpu():
    """fp8-compile-fastacc-cudagraphs (Triton attention, fp8, regional compile, CUDA graphs) on the GPU in bf16."""
    from engine.measure import psnr

    images, plain = _kontext_after_text_to_image("fp8-compile-fastacc-cudagraphs", "cuda", torch.bfloat16)
    assert psnr(images, plain) >= 35.0  # fp8 weights and bf16 on the tiny model: the fp8 attention floor of #17


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="our kernels, fp8 and CUDA graphs need CUDA")
@pytest.mark.parametrize("task", ["img2img", "inpaint", "fill", "control", "kontext-inpaint"])
def test_each_task_on_the_fastest_preset_on_the_gpu(task):
    from engine.measure import psnr

    variant = TASKS[task].tiny
    pipeline_class = getattr(diffusers, TASKS[task].pipeline_class)
    plain = pipeline_class(**synthetic_components(variant, device="cuda", dtype=torch.bfloat16))
    engine = FluxEngine.from_pretrained(f"synthetic:{variant}", "fp8-compile-fastacc-cudagraphs", device="cuda",
                                        task=task)  # fmt: skip
    assert psnr(_call(engine, **INPUTS[task]), _call(plain, **INPUTS[task])) >= 35.0


def test_the_controlnet_engine_takes_a_synthetic_or_given_controlnet():
    """task='controlnet' with controlnet='synthetic:tiny' (random weights by the engine's seed) makes diffusers'
    FluxControlNetPipeline image with the same ControlNet, whose blocks are optimised too (tests/test_controlnet.py)."""
    from engine.models import synthetic_controlnet

    inputs = {"control_image": _picture(3), "controlnet_conditioning_scale": 0.7}
    components = synthetic_components("tiny", device="cpu", dtype=torch.float32)
    controlnet = synthetic_controlnet("tiny", device="cpu", dtype=torch.float32, seed=0)
    plain = _call(diffusers.FluxControlNetPipeline(**components, controlnet=controlnet), **inputs)
    engine = FluxEngine.from_pretrained("synthetic:tiny", FUSED, device="cpu", task="controlnet",
                                        controlnet="synthetic:tiny")  # fmt: skip
    assert type(engine) is ENGINES["controlnet"] and engine.controlnet_state.fused
    torch.testing.assert_close(_call(engine, **inputs), plain, atol=1e-5, rtol=0)
    given = FluxEngine.from_pretrained("synthetic:tiny", "baseline", device="cpu", task="controlnet",
                                       controlnet=controlnet)  # fmt: skip
    assert given.controlnet is controlnet and torch.equal(_call(given, **inputs), plain)


def _tiny_redux(components: dict):
    """FluxPriorReduxPipeline with a tiny SigLIP (28 px, 4 image tokens) and Redux embedder, and the tiny text
    encoders: its prompt embeddings are the T5 tokens and the picture's, side by side."""
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    torch.manual_seed(0)
    vision = SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, image_size=28, patch_size=14))  # fmt: skip
    embedder = ReduxImageEncoder(redux_dim=16, txt_in_features=components["transformer"].config.joint_attention_dim)
    texts = {name: components[name] for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
    processor = SiglipImageProcessorPil(size={"height": 28, "width": 28})
    return diffusers.FluxPriorReduxPipeline(vision, processor, embedder, **texts)


def test_redux_embeddings_feed_the_engine_without_recompiling():
    """FluxPriorReduxPipeline's outputs (T5 tokens + the picture's tokens) into a compiled engine after a plain
    prompt: the longer text sequence compiles nothing new, and the image is diffusers' with the same embeddings."""
    from torch._dynamo.utils import counters

    from engine.config import CompileConfig

    components = synthetic_components("tiny", device="cpu", dtype=torch.float32)
    redux = _tiny_redux(components)(_picture(4), prompt="a red fox")
    embeds = {"prompt_embeds": redux.prompt_embeds, "pooled_prompt_embeds": redux.pooled_prompt_embeds}
    assert redux.prompt_embeds.shape[1] == 512 + 4  # Redux encodes the prompt to 512 T5 tokens
    plain = _call(diffusers.FluxPipeline(**components), prompt=None, **embeds)
    torch._dynamo.reset()
    config = EngineConfig(attention=AttentionConfig(backend="auto"),
                          compile=CompileConfig(mode="regional", backend="aot_eager"))  # fmt: skip
    engine = FluxEngine.from_pretrained("synthetic:tiny", config, device="cpu")
    _call(engine)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        images = _call(engine, prompt=None, **embeds)
    assert counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(images, plain, atol=1e-5, rtol=0)


def test_tiled_vae_encodes_a_tasks_input_picture_in_tiles():
    """VaeConfig(tiling='on') tiles the encode of the input picture too (img2img at 256^2 in 128-px tiles): one tiled
    encode, one tiled decode. Against untiled diffusers: 30.4 dB measured; the tiny random VAE's seams at 128 px
    (tests/test_vae.py checks the tiled encode itself against the untiled one)."""
    from engine.config import VaeConfig
    from engine.measure import psnr

    size = 256
    inputs = {"image": synthetic_inputs("img2img", size, size)["image"], "strength": 0.6, "height": size, "width": size}
    plain = _call(diffusers.FluxImg2ImgPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32)),
                  **inputs)  # fmt: skip
    config = EngineConfig(vae=VaeConfig(tiling="on", tile=128, overlap=32))
    engine = FluxEngine.from_pretrained("synthetic:tiny", config, device="cpu", task="img2img")
    images = _call(engine, **inputs)
    assert (engine.vae_state.tiled_encodes, engine.vae_state.untiled_encodes) == (1, 0)
    assert psnr(images, plain) >= 28.0


@pytest.mark.parametrize(("task", "policy"), [("kontext", "block"), ("fill", "leaf"), ("control", "model")])
def test_each_offload_policy_makes_the_tasks_resident_image(task, policy):
    """The task engines under offload (blocks or leaves streamed through the device, or whole models visiting it):
    the image of the same engine with everything resident, to the bit."""
    from engine.config import OffloadConfig

    variant = f"synthetic:{TASKS[task].tiny}"
    resident = _call(FluxEngine.from_pretrained(variant, FUSED, device="cpu", task=task), **INPUTS[task])
    config = EngineConfig(attention=AttentionConfig(backend="auto"), offload=OffloadConfig(policy=policy))
    engine = FluxEngine.from_pretrained(variant, config, device="cpu", task=task)
    assert engine.offload_state is not None
    assert torch.equal(_call(engine, **INPUTS[task]), resident)


def test_bench_and_generate_take_the_controlnet_task(tmp_path):
    """--task controlnet: the ControlNet of the synthetic model's variant by default (diffusers' pipeline and the
    engine share it), diffusers' FluxControlNetPipeline as the baseline; generate's image is the engine's."""
    import json

    from engine import generate
    from engine.bench import cli
    from engine.memory.planner import fastest_config

    out = tmp_path / "controlnet.json"
    argv = ["--task", "controlnet", "--res", "64", "--steps", "2", "--preset", "baseline", "--device", "cpu"]
    assert cli.main([*argv, "--allow-any-size", "--out", str(out)]) == 0
    rows = {row["config"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["baseline"]["psnr_db"] == "inf"
    _picture(3).save(tmp_path / "edges.png")
    argv = ["a fox", "--res", "64", "--steps", "2", "--device", "cpu", "--task", "controlnet"]
    files = ["--control-image", str(tmp_path / "edges.png"), "-o", str(tmp_path / "fox.png")]
    assert generate.main([*argv, *files]) == 0
    assert generate.main([*argv[:-2], "--controlnet", str(tmp_path / "nowhere"), *files]) == 2
    choice = fastest_config("cuda", [(1024, 1024)], card_gib=80.0, fp8_hardware=True, triton=True, task="controlnet")
    assert choice.config.name == "fp8-compile-fastacc-cudagraphs"  # the residuals are inputs of the CUDA graph


@pytest.mark.parametrize(
    ("task", "mode"), [("kontext", "int8-weight"), ("fill", "fp8-weight"), ("inpaint", "int8-weight")]
)
def test_quantised_task_engines_stay_within_their_modes_tolerance(task, mode):
    """The weight-only modes (optimum-quanto, CPU too) on the task engines, within the tolerance they have on
    text-to-image (tests/test_quantize.py: int8-weight 60 dB, fp8-weight 45 dB)."""
    from engine.config import QuantConfig
    from engine.measure import psnr

    variant = TINY_OF[TASKS[task].channels]
    pipeline_class = getattr(diffusers, TASKS[task].pipeline_class)
    plain = _call(pipeline_class(**synthetic_components(variant, device="cpu", dtype=torch.float32)), **INPUTS[task])
    config = EngineConfig(attention=AttentionConfig(backend="auto"), quant=QuantConfig(transformer=mode))
    engine = FluxEngine.from_pretrained(f"synthetic:{variant}", config, device="cpu", task=task)
    assert psnr(_call(engine, **INPUTS[task]), plain) >= {"int8-weight": 60.0, "fp8-weight": 45.0}[mode]


@pytest.mark.parametrize("task", list(INPUTS))
def test_every_task_takes_the_vae_kernels(task):
    """VaeConfig(kernels=True) (the fastest presets' VAE: channels_last, the attention as GEMMs, the Triton
    GroupNorm) under each task's own encode and latent packing: the images of its diffusers class within fp32
    rounding (an NHWC encoding that a pipeline's `.view` could not take would fail here)."""
    from engine.config import VaeConfig

    pipeline_class = getattr(diffusers, TASKS[task].pipeline_class)
    variant = TINY_OF[TASKS[task].channels]
    plain = _call(pipeline_class(**synthetic_components(variant, device="cpu", dtype=torch.float32)), **INPUTS[task])
    engine = FluxEngine.from_pretrained(f"synthetic:{variant}", EngineConfig(vae=VaeConfig(kernels=True)),
                                        device="cpu", task=task)  # fmt: skip
    assert "vae-kernels" in [step.name for step in engine.engine_steps]
    # measured: 1.5e-6 to 2.2e-6 on [0, 1] images across the tasks (fp32; only summation orders differ)
    torch.testing.assert_close(_call(engine, **INPUTS[task]), plain, atol=1e-5, rtol=0)


def test_the_vae_kernels_in_tiles():
    """The VAE kernels under the tiled encode and decode (NHWC tiles blended): as the tiled VAE without them."""
    from engine.config import VaeConfig

    size = 192  # 2 x 2 tiles of 128 px
    inputs = {"image": synthetic_inputs("img2img", size, size)["image"], "strength": 0.6, "height": size, "width": size}
    tiled = VaeConfig(tiling="on", tile=128, overlap=32)
    images = [
        _call(
            FluxEngine.from_pretrained("synthetic:tiny", EngineConfig(vae=config), device="cpu", task="img2img"),
            **inputs,
        )  # fmt: skip
        for config in (tiled, VaeConfig(tiling="on", tile=128, overlap=32, kernels=True))
    ]
    torch.testing.assert_close(images[1], images[0], atol=1e-5, rtol=0)  # measured: 2.3e-6 (fp32)
