"""flux-engine: a faster, leaner FLUX.1 pipeline, a drop-in for diffusers.FluxPipeline.

from engine import FluxEngine
pipe = FluxEngine.from_pretrained("synthetic:tiny")          # or a local diffusers folder
image = pipe("a cat", height=256, width=256).images[0]
"""

from .config import (
    PRESETS,
    AttentionConfig,
    CompileConfig,
    EngineConfig,
    OffloadConfig,
    QuantConfig,
    VaeConfig,
    preset,
)
from .errors import (
    CheckpointError,
    ConfigError,
    EngineError,
    EngineOutOfMemoryError,
    InputError,
    ResolutionError,
    VariantError,
)
from .models import VARIANTS, synthetic_components, synthetic_pipeline
from .pipeline import FluxEngine, optimize

__all__ = [
    "PRESETS",
    "VARIANTS",
    "AttentionConfig",
    "CheckpointError",
    "CompileConfig",
    "ConfigError",
    "EngineConfig",
    "EngineError",
    "EngineOutOfMemoryError",
    "OffloadConfig",
    "QuantConfig",
    "VaeConfig",
    "FluxEngine",
    "InputError",
    "ResolutionError",
    "VariantError",
    "optimize",
    "preset",
    "synthetic_components",
    "synthetic_pipeline",
]
