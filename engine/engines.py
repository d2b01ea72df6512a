"""FluxEngine, a drop-in `diffusers.FluxPipeline`, and one engine per other FLUX.1 task (img2img, inpaint, Kontext,
Fill, Control, ...): each is the diffusers pipeline class of its task with the same call and outputs, a
`from_pretrained` that takes local paths or synthetic variant names (`task=` picks the engine), and clear errors where
diffusers would fail deep inside.

    from engine import FluxEngine
    edit = FluxEngine.from_pretrained("synthetic:flux-kontext", "fp8-compile", task="kontext")
    image = edit("make it snow", image=picture).images[0]      # a FluxKontextEngine: FluxKontextPipeline's call
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
from pathlib import Path

import diffusers
import torch

from .config import EngineConfig, resolve_config
from .errors import ConfigError, EngineOutOfMemoryError, InputError, ParallelError
from .lora_calls import check_local_lora
from .models.builders import synthetic_components
from .models.controlnet import load_controlnet
from .models.loading import load_local_components
from .models.variants import SYNTHETIC_PREFIX, is_variant_name, resolve_device, variant_spec
from .pipeline import ENGINE_CONFIG_ATTR, STATE_ATTRS, default_dtype, engine_config_of, optimize
from .tasks import TASKS, check_task_inputs, components_for, steps_run


class EngineCalls:
    """What every engine adds to its diffusers pipeline class (the class after this one in its bases)."""

    task = "text-to-image"

    @classmethod
    def from_pretrained(
        cls,
        path_or_variant: str | Path,
        config: EngineConfig | str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        seed: int = 0,
        config_folder: str | Path | None = None,
        torch_dtype: torch.dtype | None = None,
        task: str | None = None,
        controlnet=None,
        variant: str | None = None,
        local_files_only: bool = True,
    ):
        """Load a local model, or build a synthetic one, and optimise it with `config`.

        path_or_variant: a diffusers-format folder; a BFL single-file transformer `.safetensors`
            (with `config_folder`, a diffusers-format folder for the rest); or a variant name such as
            `synthetic:flux-dev`, `synthetic:flux-schnell`, `synthetic:tiny` (random weights, by `seed`).
        dtype: the weights' dtype (bf16 on CUDA, fp32 on CPU by default); `torch_dtype` is accepted as in diffusers.
        task: the engine to return ("text-to-image", "img2img", "inpaint", "kontext", "fill", "control", ...;
            engine.TASKS), each the diffusers pipeline class of that task; by default the class this is called on.
        controlnet: for task "controlnet", a FluxControlNetModel (or FluxMultiControlNetModel), the path of a local
            diffusers-format ControlNet folder, or a synthetic one of a variant's architecture ("synthetic:flux-dev").
        variant: the weight files' variant, as in diffusers (`variant="fp16"` reads model.fp16.safetensors).
        local_files_only: accepted as in diffusers; nothing is ever fetched from a model hub, whatever it says.
        """
        del local_files_only  # always local
        cls = _class_for(cls, task)
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ConfigError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass one of them")
        parallel = resolve_config(config).parallel
        if parallel.enabled:  # each rank builds its pipeline on its own GPU (cuda:LOCAL_RANK)
            from .parallel import init_distributed

            device = init_distributed(parallel.degree, parallel.timeout_s, device).device
        device = resolve_device(device)
        dtype = dtype or torch_dtype or default_dtype(device)
        # before the transformer: a ControlNet argument that does not work fails in seconds, not after the load
        controlnet = _controlnet_for(cls, controlnet, device, dtype, seed, variant)
        source = str(path_or_variant)
        if is_variant_name(source):
            components = synthetic_components(source, device=device, dtype=dtype, seed=seed)
            model_name = SYNTHETIC_PREFIX + variant_spec(source).name
        else:
            # quantised components are quantised layer by layer as they load: the load peak is the quantised size
            quant = resolve_config(config).quant
            components = load_local_components(
                source, device=device, dtype=dtype, config_folder=config_folder, quant=quant, variant=variant
            )
            model_name = source
        if controlnet is not None:
            components["controlnet"] = controlnet
        engine = cls(**components_for(cls, components))
        engine.model_name = model_name
        return optimize(engine, config)

    @classmethod
    def from_pipe(cls, pipe, config: EngineConfig | str | None = None, task: str | None = None, controlnet=None):
        """An engine over the same components as `pipe` (shared, not copied), optimised with `config`: this class's
        task, or `task`'s (an img2img engine over a text-to-image pipeline's components, say). `controlnet`: as in
        from_pretrained, for task "controlnet" over a pipeline without one (a ControlNet pipeline's own by default)."""
        cls = _class_for(cls, task)
        components = dict(pipe.components)
        if cls.task == "controlnet" or controlnet is not None:
            transformer = components["transformer"]
            device = getattr(pipe, "_execution_device", transformer.device)
            given = controlnet if controlnet is not None else components.get("controlnet")
            components["controlnet"] = _controlnet_for(cls, given, device, transformer.dtype)
        engine = cls(**components_for(cls, components))
        engine.model_name = getattr(pipe, "model_name", "pipeline")
        # the components are shared: what was done to them travels with them, so optimize() can refuse to
        # stack a second config on modules the first one already rewrote
        for name in (ENGINE_CONFIG_ATTR, *STATE_ATTRS):
            if hasattr(pipe, name):
                setattr(engine, name, getattr(pipe, name))
        return optimize(engine, config)

    def save_config(self, save_directory, *args, **kwargs):
        """diffusers' save_config, naming the diffusers class this engine is as the folder's `_class_name`: a folder
        saved from an engine (`save_pretrained`) then loads in diffusers' `DiffusionPipeline.from_pretrained`, which
        looks the name up in diffusers (before: "module diffusers has no attribute FluxEngine"), and in ours."""
        super().save_config(save_directory, *args, **kwargs)
        path = Path(save_directory) / self.config_name
        if path.is_file():
            index = json.loads(path.read_text())
            index["_class_name"] = next(c for c in type(self).__mro__ if c.__module__.startswith("diffusers.")).__name__
            path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, *args, **kwargs):
        """diffusers' load_lora_weights from local files and state dicts only, whatever the config: a path that does not
        exist is refused (diffusers would try the hub with it, on the presets that leave its LoRA calls alone)."""
        check_local_lora(pretrained_model_name_or_path_or_dict)
        return super().load_lora_weights(pretrained_model_name_or_path_or_dict, *args, **kwargs)

    @property
    def engine_config(self) -> EngineConfig:
        return engine_config_of(self) or resolve_config(None)

    def __call__(self, *args, **kwargs):
        """The diffusers class's call. Under a parallel config every rank makes the same call; rank 0 returns the
        images, the other ranks None."""
        bound = inspect.signature(type(self).__call__).bind(self, *args, **kwargs)
        bound.apply_defaults()
        self._check_call(bound.arguments)
        step_cache = getattr(self, "step_cache_state", None)
        if step_cache is not None:  # a call that failed half-way left its steps counted
            step_cache.reset()
        parallel = getattr(self, "parallel_state", None)
        try:
            if parallel is None:
                return super().__call__(*args, **kwargs)
            self._check_same_call(parallel, bound.arguments)
            output = super().__call__(*args, **kwargs)
            return output if parallel.returns_images else None
        except torch.OutOfMemoryError as err:
            failure = str(err).splitlines()[0] if str(err) else "CUDA out of memory"
        except RuntimeError as err:
            if parallel is None or not _is_collective_failure(err):
                raise
            world = parallel.world
            timeout = world.timeout_s if world.timeout_s is not None else parallel.config.timeout_s
            raise ParallelError(
                f"rank {world.rank} of {world.size}: a collective failed or waited past its timeout "
                f"(parallel.timeout_s={timeout:g} s), so another rank failed, hung or was called differently (its "
                f"own error is in its output): {str(err).splitlines()[0] if str(err) else err!r}"
            ) from err
        # outside the except block: the traceback (and the tensors its frames hold) is already released
        self._recover_from_oom()
        raise EngineOutOfMemoryError(self._oom_message(bound.arguments, failure))

    def _check_same_call(self, parallel, call: dict) -> None:
        """Every rank must make the same call (each runs the same loop of collectives): sizes, steps and batch are
        compared first, so a rank called differently is named instead of hanging."""
        from .parallel.runtime import check_same_everywhere

        default = self.default_sample_size * self.vae_scale_factor
        negative = call["negative_prompt"] is not None or call["negative_prompt_embeds"] is not None
        guidance = call["guidance_scale"]
        sigmas = [float(sigma) for sigma in call["sigmas"]] if call["sigmas"] is not None else []
        values = (
            int(call["height"] or default),
            int(call["width"] or default),
            int(call["num_inference_steps"]) if call["sigmas"] is None else len(call["sigmas"]),
            _batch_of(call),
            -1.0 if guidance is None else float(guidance),
            float(call["true_cfg_scale"]),
            float(negative),
            # the sigmas' values (two sums: one tuple length on every rank), and whether the VAE decodes at all (a
            # rank that decodes waits in the shared tiles for the others)
            round(sum(sigmas), 9),
            round(sum(sigma * sigma for sigma in sigmas), 9),
            float(call["output_type"] == "latent"),
        )
        what = (
            "calls (height, width, steps, batch, guidance, true_cfg_scale, negative prompt, sigmas' sum and sum of "
            "squares, latent output)"
        )
        check_same_everywhere(what, values, parallel.world)

    def _recover_from_oom(self) -> None:
        """Free what the failed call held, so that the next call (smaller, or after another config) works."""
        import gc

        offload = getattr(self, "offload_state", None)
        if offload is not None:
            offload.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def _oom_message(self, call: dict, failure: str) -> str:
        height = call["height"] or self.default_sample_size * self.vae_scale_factor
        width = call["width"] or self.default_sample_size * self.vae_scale_factor
        batch = _batch_of(call)
        config = self.engine_config
        lines = [f"out of GPU memory at {width}x{height}, batch {batch}, with config {config.label!r} ({failure})."]
        device = self.transformer.device
        budget_gib = _device_budget_gib(device)
        variant = _variant_of(self.transformer)
        if budget_gib is not None and variant is not None:
            from .memory.planner import plan

            try:
                lines.append(_leaner_plan_advice(plan, config, budget_gib, height, width, variant, batch))
            except ConfigError as err:
                lines.append(str(err))
        lines.append("The memory the call held was freed; the pipeline can be called again.")
        return " ".join(lines)

    def _check_call(self, call: dict) -> None:
        """Reject, with a clear message, inputs that diffusers only notices deep inside the model (or not at all:
        a NaN guidance scale makes a NaN image without a word)."""
        steps = call["num_inference_steps"]
        if call["sigmas"] is None and (not _is_int(steps) or steps < 1):
            raise InputError(f"num_inference_steps={steps!r} must be an integer >= 1 (FLUX.1-dev: 28-50, schnell: 4)")
        smallest = self.vae_scale_factor * 2
        for name in ("height", "width"):
            value = call[name]
            if value is None:
                continue
            if not _is_whole_number(value):
                raise InputError(
                    f"{name}={value!r} is not a whole number of pixels; pass an int that is a multiple of 16, "
                    f"such as 1024 (or None for the model's default)"
                )
            if value < smallest:
                raise InputError(f"{name}={value} is below the smallest image of {smallest} pixels")
        for name in ("guidance_scale", "true_cfg_scale"):
            if name not in call:  # Fill and Control have no true CFG
                continue
            value = call[name]
            if value is None and name == "guidance_scale" and not self.transformer.config.guidance_embeds:
                continue  # schnell has no guidance input: diffusers never reads it
            if not _is_finite_number(value):
                raise InputError(
                    f"{name}={value!r} must be a finite number (FLUX.1-dev is distilled for 3.5; "
                    f"true_cfg_scale 1.0 turns true CFG off)"
                )
        images = call["num_images_per_prompt"]
        if not _is_int(images) or images < 1:
            raise InputError(f"num_images_per_prompt={images!r} must be an integer >= 1")
        self._check_embeds(call)
        self._check_latents(call)
        check_task_inputs(self, call)
        if call["sigmas"] is None:
            strength = call.get("strength")  # img2img and inpainting run the last steps only
            run = steps_run(steps, strength)
            self.engine_config.step_cache.check_steps_exist(run, "" if run == steps else f" (strength={strength:g})")

    def _check_embeds(self, call: dict) -> None:
        config = self.transformer.config
        for name, width in (
            ("prompt_embeds", config.joint_attention_dim),
            ("pooled_prompt_embeds", config.pooled_projection_dim),
        ):
            value = call[name]
            if value is not None and value.shape[-1] != width:
                raise InputError(
                    f"{name} has last dimension {value.shape[-1]}, this transformer takes {width}; "
                    "encode the prompt with this pipeline's text encoders"
                )

    def _check_latents(self, call: dict) -> None:
        latents = call["latents"]
        if latents is None or "max_area" in call:  # Kontext sizes its latents from max_area and the image
            return
        height = call["height"] or self.default_sample_size * self.vae_scale_factor
        width = call["width"] or self.default_sample_size * self.vae_scale_factor
        patches = (height // (self.vae_scale_factor * 2)) * (width // (self.vae_scale_factor * 2))
        channels = 4 * self.vae.config.latent_channels  # the noise latents (Fill and Control add theirs beside)
        if latents.ndim != 3 or latents.shape[1:] != (patches, channels):
            raise InputError(
                f"latents have shape {tuple(latents.shape)}; for {height}x{width} this pipeline takes packed latents "
                f"of shape (batch, {patches}, {channels}); make them with pipe.prepare_latents(...) or leave "
                "latents=None"
            )


def _leaner_plan_advice(plan, config: EngineConfig, budget_gib: float, height, width, variant, batch) -> str:
    """The planner's choice for this budget; if that is the config that just failed (the allocator's
    fragmentation ate the margin), the choice for a smaller budget, so the advice always changes something."""
    from dataclasses import replace

    failed = replace(config, name="")
    planned_for = budget_gib
    suggestion = plan(planned_for, height, width, variant=variant, batch=batch)
    while replace(suggestion.config, name="") == failed and planned_for > 2:
        planned_for -= 1
        suggestion = plan(planned_for, height, width, variant=variant, batch=batch)
    label = replace(suggestion.config, name="").label
    return (
        f"Predicted to fit this GPU's {budget_gib:.1f} GiB: {label} (peak {suggestion.chosen.peak_gib:.1f} GiB): "
        f"FluxEngine.from_pretrained(..., config=engine.for_budget({planned_for:g}, {height}, {width}))."
    )


def _is_collective_failure(err: RuntimeError) -> bool:
    """A torch.distributed error (a timeout, a peer gone) rather than a bug of this rank's own."""
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(err)
    return isinstance(err, dist_error) or any(
        marker in text for marker in ("Timed out", "timed out", "Connection closed by peer", "NCCL", "gloo")
    )


def _is_int(value) -> bool:
    """An integer (Python's or NumPy's), never a bool: what diffusers counts steps and images with."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_whole_number(value) -> bool:
    """An integer, or a real number with no fraction (diffusers takes 1024.0, or numpy's float32(1024), as a size)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return _is_int(value) or float(value).is_integer()


def _is_finite_number(value) -> bool:
    """A finite real number, or a one-element tensor holding one (diffusers multiplies guidance into a tensor)."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.dtype.is_complex and bool(torch.isfinite(value).all())
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _batch_of(call: dict) -> int:
    prompt = call["prompt"]
    prompts = len(prompt) if isinstance(prompt, list) else 1
    return prompts * (call["num_images_per_prompt"] or 1)


def _device_budget_gib(device: torch.device) -> float | None:
    """The memory this process may use on `device`: the card's, times a set_per_process_memory_fraction."""
    if device.type != "cuda":
        return None
    from .memory.budget import budget_gib

    return budget_gib(device)


def _variant_of(transformer) -> str | None:
    """The variant whose transformer has this config (the planner's memory model is per variant)."""
    from .models.variants import VARIANTS

    config = dict(transformer.config)
    for name, spec in VARIANTS.items():
        if all(config.get(key) == value for key, value in spec.transformer.items()):
            return name
    return None


# ----------------------------------------------------------------------------- the engines, one per task


class FluxEngine(EngineCalls, diffusers.FluxPipeline):
    """A faster `diffusers.FluxPipeline`: same call, same outputs within the config's stated tolerance."""


class FluxImg2ImgEngine(EngineCalls, diffusers.FluxImg2ImgPipeline):
    task = "img2img"


class FluxInpaintEngine(EngineCalls, diffusers.FluxInpaintPipeline):
    task = "inpaint"


class FluxKontextEngine(EngineCalls, diffusers.FluxKontextPipeline):
    task = "kontext"


class FluxKontextInpaintEngine(EngineCalls, diffusers.FluxKontextInpaintPipeline):
    task = "kontext-inpaint"


class FluxFillEngine(EngineCalls, diffusers.FluxFillPipeline):
    task = "fill"


class FluxControlEngine(EngineCalls, diffusers.FluxControlPipeline):
    task = "control"


class FluxControlImg2ImgEngine(EngineCalls, diffusers.FluxControlImg2ImgPipeline):
    task = "control-img2img"


class FluxControlInpaintEngine(EngineCalls, diffusers.FluxControlInpaintPipeline):
    task = "control-inpaint"


class FluxControlNetEngine(EngineCalls, diffusers.FluxControlNetPipeline):
    task = "controlnet"


ENGINES = {engine.task: engine for engine in (
    FluxEngine, FluxImg2ImgEngine, FluxInpaintEngine, FluxKontextEngine, FluxKontextInpaintEngine, FluxFillEngine,
    FluxControlEngine, FluxControlImg2ImgEngine, FluxControlInpaintEngine, FluxControlNetEngine,
)}  # fmt: skip


def _call_of(pipeline_class):
    """EngineCalls.__call__ under the diffusers class's own signature and docs (help(), IDEs, argument binding)."""

    def __call__(self, *args, **kwargs):
        return EngineCalls.__call__(self, *args, **kwargs)

    __call__.__signature__ = inspect.signature(pipeline_class.__call__)
    __call__.__doc__ = pipeline_class.__call__.__doc__
    return __call__


for _engine in ENGINES.values():
    _pipeline_class = getattr(diffusers, TASKS[_engine.task].pipeline_class)
    assert issubclass(_engine, _pipeline_class), (_engine, _pipeline_class)
    _engine.__call__ = _call_of(_pipeline_class)
    if _engine.__doc__ is None:
        _engine.__doc__ = (
            f"A faster `diffusers.{_pipeline_class.__name__}` (task {_engine.task!r}): same call, same outputs within "
            "the config's stated tolerance."
        )


def _controlnet_for(cls, controlnet, device, dtype: torch.dtype, seed: int = 0, variant: str | None = None):
    """The ControlNet of a task='controlnet' engine (models.controlnet.load_controlnet); None for the other tasks."""
    if controlnet is not None and cls.task != "controlnet":
        raise ConfigError(f"controlnet= is for task='controlnet'; {cls.__name__} runs task {cls.task!r}")
    return load_controlnet(controlnet, device, dtype, seed, variant) if cls.task == "controlnet" else None


def _class_for(cls, task: str | None):
    """The engine class for `task` (None: `cls` itself); FluxEngine hands out every task's, the others their own."""
    if task is None:
        return cls
    if task not in ENGINES:
        raise ConfigError(f"task={task!r} is not a FLUX.1 task; pick one of {', '.join(map(repr, ENGINES))}")
    if cls is not FluxEngine and cls.task != task:
        raise ConfigError(
            f"{cls.__name__} runs task {cls.task!r}, not {task!r}; call FluxEngine.from_pretrained(..., task={task!r}) "
            f"(or {ENGINES[task].__name__}.from_pretrained(...))"
        )
    return ENGINES[task]
