"""Synthetic, random-init FLUX.1 components built directly on the target device in the target dtype (no fp32
detour), deterministic by seed; the builders also serve the meta device (engine.memory.weights.meta_component)."""

from __future__ import annotations

import contextlib

import torch

from .tokenizers import synthetic_clip_tokenizer, synthetic_t5_tokenizer
from .variants import ModelSpec, check_device_fits_variant, variant_spec

# ----------------------------------------------------------------------------- synthetic builders


@contextlib.contextmanager
def dtype_as_default(dtype: torch.dtype):
    """Within the block, new floating tensors and parameters default to `dtype`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_transformer(spec: ModelSpec):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**spec.transformer)


def build_t5(spec: ModelSpec, dtype: torch.dtype):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**spec.t5)
    return T5EncoderModel._from_config(config, dtype=dtype)


def build_clip(spec: ModelSpec, dtype: torch.dtype):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**spec.clip)
    return CLIPTextModel._from_config(config, dtype=dtype)


def build_vae(spec: ModelSpec):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**spec.vae)


def build_scheduler(spec: ModelSpec):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**spec.scheduler)


def synthetic_components(
    variant: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> dict:
    """Every FluxPipeline component of `variant`, random-init on `device` in `dtype`.

    Deterministic by seed on a given device (the global RNG is forked, so callers' streams are
    untouched). Modules are constructed under `torch.device(device)` with `dtype` as the default,
    so each parameter is born where and how it will live: a 12B transformer builds on an H100
    without a 48 GB fp32 detour.
    """
    spec = variant_spec(variant)
    device = torch.device(device)
    check_device_fits_variant(spec, device)
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch.device(device), dtype_as_default(dtype):
        torch.manual_seed(seed)
        transformer = build_transformer(spec)
        text_encoder_2 = build_t5(spec, dtype)
        text_encoder = build_clip(spec, dtype)
        vae = build_vae(spec)
    components = {
        "transformer": transformer.eval().requires_grad_(False),
        "text_encoder": text_encoder.eval().requires_grad_(False),
        "text_encoder_2": text_encoder_2.eval().requires_grad_(False),
        "vae": vae.eval().requires_grad_(False),
        "tokenizer": synthetic_clip_tokenizer(spec.clip_vocab_size, spec.clip_max_length),
        "tokenizer_2": synthetic_t5_tokenizer(spec.t5_vocab_size, spec.t5_max_length),
        "scheduler": build_scheduler(spec),
    }
    return components


def synthetic_pipeline(
    variant: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    pipeline_class=None,
):
    """A plain `diffusers.FluxPipeline` (or `pipeline_class`) of synthetic components."""
    if pipeline_class is None:
        from diffusers import FluxPipeline as pipeline_class
    return pipeline_class(**synthetic_components(variant, device=device, dtype=dtype, seed=seed))
