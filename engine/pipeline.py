"""FluxEngine, a drop-in `diffusers.FluxPipeline`, and `optimize(pipe, config)`.

`optimize` applies an EngineConfig to a FluxPipeline in place, in the order attention ->
quantisation -> offload -> VAE -> compile (each step sees the modules the previous one left). FluxEngine
is a FluxPipeline subclass with the same call and outputs, a `from_pretrained` that takes local
paths or synthetic variant names, and clear errors where diffusers would fail deep inside.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
from pathlib import Path

import torch
from diffusers import FluxPipeline

from .config import EngineConfig, resolve_config
from .errors import ConfigError, EngineOutOfMemoryError, InputError, ParallelError
from .models.builders import synthetic_components
from .models.loading import load_local_components
from .models.variants import SYNTHETIC_PREFIX, is_variant_name, resolve_device, variant_spec
from .steps import AppliedSteps
from .tasks import check_flux_pipeline

logger = logging.getLogger(__name__)

_ENGINE_CONFIG_ATTR = "_flux_engine_config"
# what optimize() leaves on a pipeline, one attribute per step
_STATE_ATTRS = (
    "attention_ops",
    "quant_state",
    "offload_state",
    "vae_state",
    "parallel_state",
    "compile_state",
    "engine_steps",
)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (what FLUX ships in); fp32 on CPUs, whose bf16 convolutions are slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def engine_config_of(pipe) -> EngineConfig | None:
    """The EngineConfig that `optimize` applied to `pipe`, or None for an untouched pipeline."""
    return getattr(pipe, _ENGINE_CONFIG_ATTR, None)


def optimize(pipe, config: EngineConfig | str | None = None):
    """Apply `config` (an EngineConfig or a preset name) to `pipe` in place and return it.

    A pipeline is optimised once: the steps rewrite modules (processors, weights, hooks), so
    applying a second config on top of the first would stack them. Build or load a fresh pipeline
    to try another config.
    """
    config = resolve_config(config)
    check_flux_pipeline(pipe)
    if config.parallel.enabled and not isinstance(pipe, FluxPipeline):
        raise ConfigError(
            f"a parallel config runs text-to-image (FluxPipeline, FluxEngine) for now; {type(pipe).__name__} prepares "
            "its latents differently. Run it on one GPU, or generate with FluxEngine"
        )
    previous = engine_config_of(pipe)
    if previous is not None and not previous.is_baseline and previous != config:
        raise ConfigError(
            f"this pipeline is already optimised with {previous.label!r}; "
            f"load a fresh pipeline to apply {config.label!r}"
        )
    if previous == config:
        for name in _STATE_ATTRS:
            setattr(pipe, name, getattr(pipe, name, None))
        _share_lora_calls(pipe)
        return pipe
    # The steps in order; each part of EngineConfig that is still 'off' leaves the pipeline as it is. Each step
    # that ran is listed in pipe.engine_steps with its undo (engine.restore undoes them all).
    from .attention import apply_attention, attention_undo_blocker, remove_attention
    from .compile import apply_compile, remove_compile
    from .offload import apply_offload, remove_offload
    from .parallel.apply import apply_parallel, remove_parallel
    from .quant.apply import apply_quantization
    from .vae import apply_vae, remove_vae_tiling

    steps = AppliedSteps()
    pipe.attention_ops = apply_attention(pipe, config.attention, force=config.parallel.enabled)
    if pipe.attention_ops is not None:
        blocker = attention_undo_blocker(pipe.transformer)
        steps.add("attention", None if blocker else lambda: remove_attention(pipe.transformer), blocker)
    pipe.quant_state = apply_quantization(pipe, config.quant)
    if pipe.quant_state is not None:
        steps.add("quantization", None, "the original weights were replaced by their quantised codes")
    pipe.offload_state = apply_offload(pipe, config.offload, compiled=config.compile.mode != "none")
    if pipe.offload_state is not None:
        offload_state = pipe.offload_state
        if pipe.quant_state is None:
            steps.add("offload", lambda: remove_offload(pipe, offload_state))
        else:  # quantisation is not undone, so neither is its placement (only the whole chain would help)
            steps.add("offload", None, "it placed quantised weights, which cannot be undone")
    if pipe.quant_state is not None and pipe.transformer.device.type == "cuda":
        from .offload import compact_resident

        compact_resident(pipe, pipe.offload_state, pipe.transformer.device)  # part of quantization's step
    pipe.vae_state = apply_vae(pipe, config.vae)
    if pipe.vae_state is not None:
        steps.add("vae", lambda: remove_vae_tiling(pipe))
    # before compile: the CUDA graphs capture the split, the exchanges and the gather with the blocks
    pipe.parallel_state = apply_parallel(pipe, config.parallel, pipe.attention_ops)
    if pipe.parallel_state is not None:
        parallel_state = pipe.parallel_state
        steps.add("parallel", lambda: remove_parallel(pipe, parallel_state))
    pipe.compile_state = apply_compile(pipe, config)
    if pipe.compile_state is not None:
        compile_state = pipe.compile_state
        steps.add("compile", lambda: remove_compile(compile_state))
    from .lora import install_lora_calls, needs_lora_calls

    if needs_lora_calls(pipe):  # diffusers' LoRA calls, made to fit what the steps above did (engine/lora.py)
        steps.add("lora", install_lora_calls(pipe))
    pipe.engine_steps = steps
    setattr(pipe, _ENGINE_CONFIG_ATTR, config)
    _release_replaced_weights(pipe)
    return pipe


def _share_lora_calls(pipe) -> None:
    """A pipeline over components another pipeline optimised (FluxEngine.from_pipe): its LoRA calls need the same
    care as the first one's (engine/lora.py), on this instance too."""
    from .lora import install_lora_calls, needs_lora_calls

    if needs_lora_calls(pipe) and "load_lora_weights" not in vars(pipe):
        install_lora_calls(pipe)


def restore(pipe: FluxPipeline) -> FluxPipeline:
    """Undo every step optimize() applied to `pipe` (newest first, `pipe.engine_steps`) and return it as plain
    diffusers. ConfigError, with nothing changed, when a step cannot be undone (quantisation)."""
    steps = getattr(pipe, "engine_steps", None)
    if steps is not None:
        steps.undo_all()
    for name in _STATE_ATTRS:
        setattr(pipe, name, None)
    if hasattr(pipe, _ENGINE_CONFIG_ATTR):
        delattr(pipe, _ENGINE_CONFIG_ATTR)
    return pipe


def _release_replaced_weights(pipe) -> None:
    """Steps that rebuild weights (fused projections, quantisation) leave the old storage in the CUDA
    allocator's cache; give it back so the optimised pipeline holds no more device memory than it uses."""
    device = pipe.transformer.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class FluxEngine(FluxPipeline):
    """A faster `diffusers.FluxPipeline`: same call, same outputs within the config's stated tolerance."""

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
    ) -> FluxEngine:
        """Load a local model, or build a synthetic one, and optimise it with `config`.

        path_or_variant: a diffusers-format folder; a BFL single-file transformer `.safetensors`
            (with `config_folder`, a diffusers-format folder for the rest); or a variant name such as
            `synthetic:flux-dev`, `synthetic:flux-schnell`, `synthetic:tiny` (random weights, by `seed`).
        dtype: the weights' dtype (bf16 on CUDA, fp32 on CPU by default); `torch_dtype` is accepted as in diffusers.
        Nothing is ever fetched from a model hub.
        """
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ConfigError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass one of them")
        parallel = resolve_config(config).parallel
        if parallel.enabled:  # each rank builds its pipeline on its own GPU (cuda:LOCAL_RANK)
            from .parallel import init_distributed

            device = init_distributed(parallel.degree, parallel.timeout_s, device).device
        device = resolve_device(device)
        dtype = dtype or torch_dtype or default_dtype(device)
        source = str(path_or_variant)
        if is_variant_name(source):
            components = synthetic_components(source, device=device, dtype=dtype, seed=seed)
            model_name = SYNTHETIC_PREFIX + variant_spec(source).name
        else:
            # quantised components are quantised layer by layer as they load: the load peak is the quantised size
            components = load_local_components(
                source, device=device, dtype=dtype, config_folder=config_folder, quant=resolve_config(config).quant
            )
            model_name = source
        engine = cls(**components)
        engine.model_name = model_name
        return optimize(engine, config)

    @classmethod
    def from_pipe(cls, pipe: FluxPipeline, config: EngineConfig | str | None = None) -> FluxEngine:
        """A FluxEngine over the same components as `pipe` (shared, not copied), optimised with `config`."""
        engine = cls(**pipe.components)
        engine.model_name = getattr(pipe, "model_name", "pipeline")
        # the components are shared: what was done to them travels with them, so optimize() can refuse to
        # stack a second config on modules the first one already rewrote
        for name in (_ENGINE_CONFIG_ATTR, *_STATE_ATTRS):
            if hasattr(pipe, name):
                setattr(engine, name, getattr(pipe, name))
        return optimize(engine, config)

    @property
    def engine_config(self) -> EngineConfig:
        return engine_config_of(self) or resolve_config(None)

    def __call__(self, *args, **kwargs):
        """FluxPipeline's call. Under a parallel config every rank makes the same call; rank 0 returns the images,
        the other ranks None."""
        bound = _CALL_SIGNATURE.bind(self, *args, **kwargs)
        bound.apply_defaults()
        self._check_call(bound.arguments)
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
        if latents is None:
            return
        height = call["height"] or self.default_sample_size * self.vae_scale_factor
        width = call["width"] or self.default_sample_size * self.vae_scale_factor
        patches = (height // (self.vae_scale_factor * 2)) * (width // (self.vae_scale_factor * 2))
        channels = self.transformer.config.in_channels
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
    from .memory.planner import budget_gib

    return budget_gib(device)


def _variant_of(transformer) -> str | None:
    """The variant whose transformer has this config (the planner's memory model is per variant)."""
    from .models.variants import VARIANTS

    config = dict(transformer.config)
    for name, spec in VARIANTS.items():
        if all(config.get(key) == value for key, value in spec.transformer.items()):
            return name
    return None


_CALL_SIGNATURE = inspect.signature(FluxPipeline.__call__)
FluxEngine.__call__.__signature__ = _CALL_SIGNATURE
FluxEngine.__call__.__doc__ = FluxPipeline.__call__.__doc__
