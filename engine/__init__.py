"""flux-engine: a faster, leaner FLUX.1 pipeline, a drop-in for diffusers.FluxPipeline.

from engine import FluxEngine
pipe = FluxEngine.from_pretrained("synthetic:tiny")          # or a local diffusers folder
image = pipe("a cat", height=256, width=256).images[0]

The names below are imported on first use (PEP 562), so that `python -m engine.bench --help` and argument errors
answer before torch, diffusers and transformers are loaded.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

# public name -> the module that defines it
_EXPORTS = {
    "PRESETS": "config",
    "AttentionConfig": "config",
    "CompileConfig": "config",
    "EngineConfig": "config",
    "OffloadConfig": "config",
    "QuantConfig": "config",
    "VaeConfig": "config",
    "preset": "config",
    "CheckpointError": "errors",
    "ConfigError": "errors",
    "EngineError": "errors",
    "EngineOutOfMemoryError": "errors",
    "InputError": "errors",
    "ResolutionError": "errors",
    "VariantError": "errors",
    "VARIANTS": "models",
    "synthetic_components": "models",
    "synthetic_pipeline": "models",
    "ENGINES": "engines",
    "FluxEngine": "engines",
    "FluxImg2ImgEngine": "engines",
    "FluxInpaintEngine": "engines",
    "FluxKontextEngine": "engines",
    "FluxKontextInpaintEngine": "engines",
    "FluxFillEngine": "engines",
    "FluxControlEngine": "engines",
    "FluxControlImg2ImgEngine": "engines",
    "FluxControlInpaintEngine": "engines",
    "FluxControlNetEngine": "engines",
    "TASKS": "tasks",
    "optimize": "pipeline",
    "for_budget": "memory.planner",
    "restore": "pipeline",
}

__all__ = [
    "ENGINES",
    "AttentionConfig",
    "CheckpointError",
    "CompileConfig",
    "ConfigError",
    "EngineConfig",
    "EngineError",
    "EngineOutOfMemoryError",
    "FluxControlEngine",
    "FluxControlImg2ImgEngine",
    "FluxControlInpaintEngine",
    "FluxControlNetEngine",
    "FluxEngine",
    "FluxFillEngine",
    "FluxImg2ImgEngine",
    "FluxInpaintEngine",
    "FluxKontextEngine",
    "FluxKontextInpaintEngine",
    "InputError",
    "OffloadConfig",
    "PRESETS",
    "QuantConfig",
    "ResolutionError",
    "TASKS",
    "VARIANTS",
    "VaeConfig",
    "VariantError",
    "for_budget",
    "optimize",
    "preset",
    "restore",
    "synthetic_components",
    "synthetic_pipeline",
]

if TYPE_CHECKING:
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
    from .engines import (
        ENGINES,
        FluxControlEngine,
        FluxControlImg2ImgEngine,
        FluxControlInpaintEngine,
        FluxControlNetEngine,
        FluxEngine,
        FluxFillEngine,
        FluxImg2ImgEngine,
        FluxInpaintEngine,
        FluxKontextEngine,
        FluxKontextInpaintEngine,
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
    from .memory.planner import for_budget
    from .models import VARIANTS, synthetic_components, synthetic_pipeline
    from .pipeline import optimize, restore
    from .tasks import TASKS


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


# Two notices that third-party imports print on every run and that concern nothing flux-engine uses:
# - bitsandbytes, on a CPU with AVX512-BF16, tries `from kernels import get_kernel` (Hugging Face's hub-kernel
#   package) for a CPU 4-bit GEMM and logs a warning when that fails; our nf4 runs on CUDA only, and no hub is
#   reachable from where this engine is tested;
# - transformers falls back to PIL image processors without torchvision (FluxPipeline's optional CLIP image
#   processor, for IP-Adapters) and says so.
# Each filter drops exactly that one message from that one logger; every other record passes.
_IMPORT_NOTICES = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",
}


class _DropNotice(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


for _logger_name, _text in _IMPORT_NOTICES.items():
    logging.getLogger(_logger_name).addFilter(_DropNotice(_text))
