"""FLUX.1 models: variants, synthetic builders and tokenizers, the BFL format, local loading.

    engine.models.variants        architectures, limits, device checks
    engine.models.tokenizers      synthetic tokenizers
    engine.models.builders        random-init components (and on the meta device)
    engine.models.controlnet      random-init FLUX.1 ControlNets (InstantX / Shakker-Labs layout)
    engine.models.bfl             the BFL single-file format
    engine.models.safetensors_io  streamed safetensors reading
    engine.models.loading         local checkpoints (quantised while loading)


No code path here reaches a model hub. Synthetic models are built directly on the target device in
the target dtype (the modules' own initialisers run there; no fp32 copy ever exists), deterministic
by seed. Real checkpoints load from a local diffusers-format folder or from a BFL single-file
transformer `.safetensors` plus a diffusers-format folder for everything else.

Components to be quantised (`load_local_components(..., quant=QuantConfig(...))`) are not loaded whole:
they are built on the meta device and filled one module at a time from their safetensors (`stream_into`),
each Linear quantised as soon as it is filled, so the device peak is the quantised size plus one layer.
"""

from __future__ import annotations

from .bfl import (
    BflReader,
    bfl_to_diffusers,
    diffusers_to_bfl,
    save_bfl_single_file,
)
from .builders import (
    build_clip,
    build_scheduler,
    build_t5,
    build_transformer,
    build_vae,
    dtype_as_default,
    synthetic_components,
    synthetic_pipeline,
)
from .controlnet import (
    controlnet_config,
    synthetic_controlnet,
)
from .loading import (
    PIPELINE_COMPONENTS,
    load_component_quantized,
    load_local_components,
    load_transformer_single_file,
)
from .safetensors_io import (
    SafetensorsReader,
    component_weight_files,
    empty_model,
    meta_dtype,
    read_safetensors,
    stream_into,
)
from .tokenizers import (
    synthetic_clip_tokenizer,
    synthetic_t5_tokenizer,
)
from .variants import (
    DEVICE_TYPES,
    SYNTHETIC_PREFIX,
    VARIANTS,
    ModelSpec,
    check_device_fits_variant,
    is_variant_name,
    resolve_device,
    variant_spec,
)

__all__ = [
    "VARIANTS",
    "BflReader",
    "DEVICE_TYPES",
    "ModelSpec",
    "PIPELINE_COMPONENTS",
    "SYNTHETIC_PREFIX",
    "SafetensorsReader",
    "bfl_to_diffusers",
    "build_clip",
    "build_scheduler",
    "build_t5",
    "build_transformer",
    "build_vae",
    "check_device_fits_variant",
    "component_weight_files",
    "controlnet_config",
    "diffusers_to_bfl",
    "dtype_as_default",
    "empty_model",
    "is_variant_name",
    "load_component_quantized",
    "load_local_components",
    "load_transformer_single_file",
    "meta_dtype",
    "read_safetensors",
    "resolve_device",
    "save_bfl_single_file",
    "stream_into",
    "synthetic_clip_tokenizer",
    "synthetic_components",
    "synthetic_controlnet",
    "synthetic_pipeline",
    "synthetic_t5_tokenizer",
    "variant_spec",
]
