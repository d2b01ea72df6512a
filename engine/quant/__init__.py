"""Weight quantisation per pipeline component: fp8 (W8A8), fp8 / int8 weight-only (optimum-quanto), nf4 (bitsandbytes).

    engine.quant.policy      which Linears are quantised per component, the modes (names and lists only)
    engine.quant.fp8         the fp8 W8A8 arithmetic, Fp8Linear, FusedAway, KeepsInputDtype
    engine.quant.layers      one quantised layer per mode (quanto, nf4), fusing quantised projections
    engine.quant.apply       apply_quantization, the per-layer step, quantising while loading (LoadQuantizer)
    engine.quant.checkpoint  fp8 transformer files and quantised pipeline folders (save / load)
    engine.quant.report      SQNR summaries and the quantisation report
    engine.quant.lora        LoRA adapters on quantised layers (imports peft: loaded by engine.lora when needed)

Weight bytes per mode (what the planner predicts with) are in engine.memory.weights.
"""

from __future__ import annotations

from .apply import (
    ComponentQuant,
    LoadQuantizer,
    QuantState,
    apply_quantization,
    is_quantized_layer,
    mark_quantized,
    quant_mode_of,
    quantize_layer,
    quantize_model,
    set_fp8_options,
)
from .checkpoint import (
    FP8_FORMAT,
    QUANT_MARKER,
    QUANT_WEIGHTS,
    load_fp8_transformer,
    load_saved_quantized_transformer,
    save_fp8_transformer,
    save_quantized,
    saved_quantization,
)
from .fp8 import (
    E4M3_MAX,
    Fp8Linear,
    FusedAway,
    KeepsInputDtype,
    fp8_compute_for,
    fp8_layer_compute,
    fp8_linear,
    fp8_linear_quantized,
)
from .layers import (
    drop_fused_views,
    fuse_quantized_linears,
    layer_sqnr,
    quantized_kind,
    quantized_linear,
)
from .policy import (
    COMPONENTS,
    FUSED_VIEWS,
    KEEP,
    NF4_BLOCK,
    QUANTO_MODES,
    kept_linears,
    quantizable_linears,
)
from .report import (
    measure_layer_sqnr,
    quantization_report,
    sqnr_summary,
)

__all__ = [
    "COMPONENTS",
    "E4M3_MAX",
    "FP8_FORMAT",
    "FUSED_VIEWS",
    "KEEP",
    "NF4_BLOCK",
    "QUANTO_MODES",
    "QUANT_MARKER",
    "QUANT_WEIGHTS",
    "ComponentQuant",
    "Fp8Linear",
    "FusedAway",
    "KeepsInputDtype",
    "LoadQuantizer",
    "QuantState",
    "apply_quantization",
    "drop_fused_views",
    "fp8_compute_for",
    "fp8_layer_compute",
    "fp8_linear",
    "fp8_linear_quantized",
    "fuse_quantized_linears",
    "is_quantized_layer",
    "kept_linears",
    "layer_sqnr",
    "load_fp8_transformer",
    "load_saved_quantized_transformer",
    "mark_quantized",
    "measure_layer_sqnr",
    "quant_mode_of",
    "quantizable_linears",
    "quantization_report",
    "quantize_layer",
    "quantize_model",
    "quantized_kind",
    "quantized_linear",
    "save_fp8_transformer",
    "save_quantized",
    "saved_quantization",
    "set_fp8_options",
    "sqnr_summary",
]
