"""The FLUX.1 tasks: the diffusers pipeline class of each, the transformer input channels it packs, the images it
takes; whether a pipeline is one optimize() takes and its model fits it; and the checks of a call's images, masks
and strength, made before anything runs (diffusers fails on them deep inside, or silently stretches a mask)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from .errors import ConfigError, InputError


@dataclass(frozen=True)
class TaskSpec:
    pipeline_class: str  # the diffusers class
    channels: int  # the transformer's input channels: noise latents 64, plus the conditioning latents packed beside
    required: tuple[str, ...] = ()  # the image arguments a call must pass
    masks: tuple[str, ...] = ()  # the image arguments that are masks (any mode: diffusers makes them grayscale)
    variant: str = "flux-dev"  # the synthetic variant of its real architecture

    @property
    def tiny(self) -> str:
        """The tiny synthetic variant that fits this task (CPUs and tests)."""
        return {64: "tiny", 384: "tiny-fill", 128: "tiny-control"}[self.channels]


TASKS = {
    "text-to-image": TaskSpec("FluxPipeline", 64),
    "img2img": TaskSpec("FluxImg2ImgPipeline", 64, ("image",)),
    "inpaint": TaskSpec("FluxInpaintPipeline", 64, ("image", "mask_image"), ("mask_image",)),
    "kontext": TaskSpec("FluxKontextPipeline", 64, (), variant="flux-kontext"),  # no image: text-to-image
    "kontext-inpaint": TaskSpec(
        "FluxKontextInpaintPipeline", 64, ("image", "mask_image"), ("mask_image",), variant="flux-kontext"
    ),
    "fill": TaskSpec("FluxFillPipeline", 384, ("image", "mask_image"), ("mask_image",), variant="flux-fill"),
    "control": TaskSpec("FluxControlPipeline", 128, ("control_image",), variant="flux-canny"),
    "control-img2img": TaskSpec("FluxControlImg2ImgPipeline", 128, ("control_image", "image"), variant="flux-canny"),
    "control-inpaint": TaskSpec(
        "FluxControlInpaintPipeline", 128, ("control_image", "image", "mask_image"), ("mask_image",), "flux-canny"
    ),
    "controlnet": TaskSpec("FluxControlNetPipeline", 64, ("control_image",)),
}
_MODEL_OF_CHANNELS = {64: "FLUX.1 dev / schnell / Kontext", 384: "FLUX.1 Fill", 128: "FLUX.1 Canny / Depth"}
_IMAGE_ARGUMENTS = ("image", "mask_image", "control_image", "image_reference")


def check_task_name(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ConfigError(f"task={task!r} is not a FLUX.1 task; pick one of {', '.join(map(repr, TASKS))}")
    return TASKS[task]


def check_variant_fits_task(variant: str, in_channels: int, task: str) -> None:
    """A synthetic or loaded model whose transformer takes other channels than the task packs: refused, naming the
    variant that fits, before anything is built."""
    spec = check_task_name(task)
    if in_channels != spec.channels:
        model = _MODEL_OF_CHANNELS.get(in_channels, f"a {in_channels}-input-channel")
        raise ConfigError(
            f"task {task!r} ({spec.pipeline_class}) feeds the transformer {spec.channels} channels; {variant} takes "
            f"{in_channels} ({model} model); use --model synthetic:{spec.variant} (synthetic:{spec.tiny} on a CPU) "
            "or a checkpoint of that task"
        )


def components_for(pipeline_class, components: dict) -> dict:
    """The components `pipeline_class` takes (Fill and Control have no IP-Adapter image encoder, the others may)."""
    import inspect

    accepted = inspect.signature(pipeline_class.__init__).parameters
    return {name: module for name, module in components.items() if name in accepted}


def task_of(pipe) -> str:
    """The task of a diffusers FLUX.1 pipeline (or engine), by its class ('text-to-image' for FluxPipeline)."""
    import diffusers

    task = getattr(type(pipe), "task", None)
    if task in TASKS:
        return task
    for name, spec in TASKS.items():  # the subclasses first would matter only if one class derived from another
        if type(pipe).__name__ == spec.pipeline_class or isinstance(pipe, getattr(diffusers, spec.pipeline_class)):
            return name
    return "text-to-image"


def check_flux_pipeline(pipe) -> None:
    """optimize() takes every diffusers FLUX.1 pipeline whose transformer is a FluxTransformer2DModel (FluxPipeline,
    FluxImg2ImgPipeline, FluxInpaintPipeline, FluxKontextPipeline, FluxFillPipeline, FluxControl*Pipeline,
    FluxControlNetPipeline, ...): the steps touch the transformer, the VAE and encode_prompt, which they share."""
    from diffusers import FluxTransformer2DModel

    transformer = getattr(pipe, "transformer", None)
    if isinstance(getattr(transformer, "_orig_mod", None), FluxTransformer2DModel):  # torch.compile's wrapper
        raise ConfigError(
            f"{type(pipe).__name__}.transformer is torch.compile's OptimizedModule around a FluxTransformer2DModel; "
            "optimize() rewrites and compiles the transformer itself. Nothing was changed. Give it the transformer "
            "(pipe.transformer = pipe.transformer._orig_mod), or compile in place after optimize() "
            "(pipe.transformer.compile()), or use the 'compile' preset"
        )
    if not isinstance(transformer, FluxTransformer2DModel) or not hasattr(pipe, "vae"):
        what = type(transformer).__name__ if transformer is not None else "no transformer"
        raise ConfigError(
            f"optimize() takes a diffusers FLUX.1 pipeline with a FluxTransformer2DModel (FluxPipeline, "
            f"FluxImg2ImgPipeline, FluxInpaintPipeline, FluxKontextPipeline, FluxFillPipeline, ...); got "
            f"{type(pipe).__name__} with {what}. FluxPriorReduxPipeline makes embeddings for one of those: optimise "
            "the pipeline that takes its outputs"
        )
    _check_task_fits_model(pipe, transformer.config.in_channels)


def _check_task_fits_model(pipe, in_channels: int) -> None:
    """A pipeline class packs a fixed number of latent channels for the transformer: a Fill model in FluxPipeline would
    denoise 96-channel latents and fail in the VAE after every step has run. Refused up front, naming the task."""
    task = task_of(pipe)
    expected = TASKS[task].channels
    if in_channels != expected:
        model = _MODEL_OF_CHANNELS.get(in_channels, f"a {in_channels}-input-channel")
        fitting = [name for name, spec in TASKS.items() if spec.channels == in_channels]
        tasks = " / ".join(repr(name) for name in fitting) or "the one it was trained for"
        classes = ", ".join(TASKS[name].pipeline_class for name in fitting) or "its own pipeline class"
        control_lora = ""
        if in_channels == TASKS["text-to-image"].channels and expected == TASKS["control"].channels:  # Control LoRA
            control_lora = f"; {control_lora_route(type(pipe).__name__)} (or fuse_lora() and unload it before)"
        raise ConfigError(
            f"{type(pipe).__name__} (task {task!r}) feeds its transformer {expected} latent channels; this transformer "
            f"takes {in_channels} ({model} model). Load it with FluxEngine.from_pretrained(..., task={tasks}), or "
            f"into {classes}, and optimize() that{control_lora}"
        )


# ----------------------------------------------------------------------------- a call's images, masks, strength


def check_task_inputs(pipe, call: dict) -> None:
    """The images, masks and strength of a call to `pipe` (an engine), checked before anything runs."""
    task = task_of(pipe)
    spec = TASKS[task]
    smallest = pipe.vae_scale_factor * 2
    for name in spec.required:
        if call.get(name) is None and not (name != "control_image" and call.get("masked_image_latents") is not None):
            raise InputError(
                f"task {task!r} ({spec.pipeline_class}) needs {name}=: a PIL image"
                f"{' (any mode: it is made grayscale)' if name in spec.masks else ' in RGB'}, or a tensor / array"
            )
    sizes = {}
    for name in _IMAGE_ARGUMENTS:
        if name in call and call[name] is not None:
            sizes[name] = _check_image(name, call[name], name in spec.masks, smallest, pipe)
    image_size, mask_size = sizes.get("image"), sizes.get("mask_image")
    if image_size and mask_size and image_size != mask_size:
        raise InputError(
            f"mask_image is {mask_size[1]}x{mask_size[0]} but image is {image_size[1]}x{image_size[0]}; the mask marks "
            "pixels of the image (diffusers would stretch it to fit): pass a mask of the image's size, e.g. "
            "mask.resize(image.size)"
        )
    if "strength" in call:
        _check_strength(call)
    _check_control_lists(pipe, call)


def _check_control_lists(pipe, call: dict) -> None:
    """A FluxMultiControlNetModel takes a list of control images, one per ControlNet (one union ControlNet: any number,
    each with its control_mode), and zips them with its nets and scales: a single image failed inside diffusers
    ("'Image' object is not iterable"), a list of another length was cut to the shorter without a word."""
    nets = getattr(getattr(pipe, "controlnet", None), "nets", None)
    images = call.get("control_image")
    if nets is None or images is None:
        return
    count = len(nets)
    if not isinstance(images, list) or (count > 1 and len(images) != count):
        got = f"a list of {len(images)}" if isinstance(images, list) else f"one {type(images).__name__}"
        raise InputError(
            f"control_image is {got}, and the pipeline's FluxMultiControlNetModel has {count} ControlNets; pass a "
            f"list of {count if count > 1 else 'one or more'} control images, one per ControlNet"
            + ("" if count > 1 else " (its union ControlNet takes several, each with its control_mode)")
        )
    for name in ("controlnet_conditioning_scale", "control_mode"):
        value = call.get(name)
        if isinstance(value, list) and len(value) != len(images):
            raise InputError(
                f"{name} is a list of {len(value)} and control_image a list of {len(images)}; pass one {name} per "
                "control image (diffusers would pair them up to the shorter list without a word)"
            )


def _check_image(name: str, value, mask: bool, smallest: int, pipe) -> tuple[int, int] | None:
    """One image argument (a PIL image, an array, a tensor, or a list of them): its (height, width) in pixels, where
    it has one that a mask can be compared with (PIL images, and tensors / arrays of pixels)."""
    import numpy as np
    import torch
    from PIL import Image

    latent_channels = pipe.vae.config.latent_channels
    size = None
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, Image.Image):
            if not mask and item.mode != "RGB":
                raise InputError(
                    f"{name} has PIL mode {item.mode!r}; FLUX's VAE encodes 3-channel RGB images (diffusers fails "
                    f"inside the VAE on this one): pass {name}.convert('RGB')"
                )
            height, width = item.height, item.width
        elif isinstance(item, (torch.Tensor, np.ndarray)):
            if mask:  # (H, W), (1, H, W), (B, 1, H, W) or channels last: diffusers' mask processor takes them all
                height, width = item.shape[-2:] if isinstance(item, torch.Tensor) else item.shape[:2]
            else:
                # a tensor is (C, H, W) or (B, C, H, W); an array (H, W, C) or (B, H, W, C), as diffusers reads them
                channels_last = isinstance(item, np.ndarray)
                channels = item.shape[-1] if channels_last else item.shape[-3] if item.ndim >= 3 else None
                if item.ndim not in (3, 4) or channels not in (3, latent_channels):
                    layout = "(height, width, 3)" if channels_last else "(3, height, width)"
                    raise InputError(
                        f"{name} has shape {tuple(item.shape)}; pass an RGB image as {layout} or a batch of them"
                        + ("" if channels_last else f", or VAE latents of {latent_channels} channels")
                    )
                if channels == latent_channels and not channels_last:
                    continue  # already encoded: sized in latents, not pixels
                height, width = item.shape[-3:-1] if channels_last else item.shape[-2:]
        else:
            raise InputError(
                f"{name} is a {type(item).__name__}; pass a PIL image, a numpy array, a torch tensor, or a list of them"
            )
        if min(height, width) < smallest:
            raise InputError(f"{name} is {width}x{height} pixels; each side must be at least {smallest}")
        size = size or (int(height), int(width))
    return size


def steps_run(steps: int, strength: float | None) -> int:
    """The denoising steps a call runs: all of them, or at `strength` the last ones (diffusers' get_timesteps skips
    the first int(steps - steps * strength))."""
    return steps if strength is None else steps - int(max(steps - steps * strength, 0))


def control_lora_route(pipeline_class: str, widened: str = "the transformer's input to 128 channels") -> str:
    """How a Control LoRA reaches a Control class, which refuses a 64-channel transformer at optimize() (and a LoRA
    loaded before optimize() is refused): named by both refusals, so that neither sends the user to the other."""
    return (f"a Control LoRA (Canny / Depth LoRA, which widens {widened}) goes through a FluxPipeline: optimize() it, "
            f"load the LoRA on it, then {pipeline_class}.from_pipe(that pipeline)")  # fmt: skip


def _check_strength(call: dict) -> None:
    strength = call["strength"]
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 <= strength <= 1.0:
        raise InputError(
            f"strength={strength!r} must be a number in [0, 1]: how far the image is noised before denoising (1.0 "
            "redraws it, 0.6 keeps its layout)"
        )
    steps = call.get("num_inference_steps")
    # diffusers' get_timesteps skips the first int(steps - steps * strength) steps: none is left only at 0
    counted = call.get("sigmas") is None and isinstance(steps, numbers.Integral) and steps >= 1
    if counted and steps_run(steps, strength) < 1:
        raise InputError(
            f"strength={strength:g} leaves none of the {steps} steps to denoise (diffusers fails on it); pass a "
            "strength above 0 (0.6 keeps the image's layout)"
        )


# ----------------------------------------------------------------------------- the inputs of a task's call


def synthetic_inputs(task: str, height: int, width: int, seed: int = 0) -> dict:
    """Deterministic inputs for a `task` call at height x width (engine.bench): a smooth RGB picture (a VAE encodes
    noise into extreme latents), a mask of the middle half, a control image; each task's diffusers defaults else.
    Kontext edits a picture of the output's size (max_area is the output's area, so diffusers keeps it)."""
    import numpy as np
    from PIL import Image

    spec = check_task_name(task)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    waves = [0.5 + 0.5 * np.sin(2 * np.pi * (1 + c) * (x + y * (c - 1)) + phase) for c, phase in enumerate(phases)]
    picture = Image.fromarray((np.stack(waves, -1) * 255).astype(np.uint8), "RGB")
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    inputs = {"image": picture, "mask_image": Image.fromarray(mask, "L"), "control_image": picture.transpose(0)}
    chosen = {name: inputs[name] for name in spec.required}
    if task.startswith("kontext"):
        chosen.update(image=picture, max_area=height * width)
    return chosen


def condition_tokens(task: str, height: int, width: int) -> int:
    """The image tokens a task adds to the transformer's sequence beside the noise (engine.bench's FLOPs, the
    planner): Kontext attends over its input picture too, which diffusers resizes to the preferred Kontext
    resolution nearest the picture's aspect ratio (1024x1024 for a square), as `synthetic_inputs` makes it."""
    if not task.startswith("kontext"):
        return 0  # Fill and Control pack their conditioning as channels, not tokens
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    _, kept_width, kept_height = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return (kept_height // 16) * (kept_width // 16)


def file_inputs(task: str, image: str | None, mask: str | None, control: str | None, strength: float | None) -> dict:
    """The call inputs of `engine.generate --task` from image files (read and checked before any model is built)."""
    from PIL import Image, UnidentifiedImageError

    spec = check_task_name(task)
    given = {"image": image, "mask_image": mask, "control_image": control}
    flags = {"image": "--image", "mask_image": "--mask", "control_image": "--control-image"}
    inputs = {}
    for name, path in given.items():
        if path is None:
            if name in spec.required:
                raise InputError(f"--task {task} needs {flags[name]} PATH (an image file)")
            continue
        if name not in spec.required and not (name == "image" and task.startswith("kontext")):
            raise InputError(f"--task {task} takes no {flags[name]}; it takes {', '.join(spec.required) or 'none'}")
        try:
            with Image.open(path) as opened:
                picture = opened.convert("L" if name in spec.masks else "RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise InputError(
                f"{flags[name]} {path!r} is not a readable image file ({err}); pass a PNG / JPEG / WebP"
            ) from err
        inputs[name] = picture
    if strength is not None:
        if task not in _STRENGTH_TASKS:
            raise InputError(f"--strength is for {', '.join(_STRENGTH_TASKS)}; --task {task} takes none")
        inputs["strength"] = strength
    return inputs


_STRENGTH_TASKS = ("img2img", "inpaint", "kontext-inpaint", "fill", "control-img2img", "control-inpaint")
