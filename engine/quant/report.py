"""Reports: per-layer SQNR summaries, what quantising a pipeline did, SQNR on real activations.

Random-init weights lack the outliers of trained ones: the SQNR figures here are a floor on what the
arithmetic does, not a measurement of a real checkpoint's fidelity.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch
from torch import nn

from .apply import QuantState
from .layers import layer_sqnr
from .policy import quantizable_linears


def sqnr_summary(per_layer: dict[str, float], worst: int = 5) -> dict:
    if not per_layer:
        return {"layers": 0}
    values = sorted(per_layer.items(), key=lambda kv: kv[1])
    finite = [v for _, v in values]
    return {
        "layers": len(values),
        "min_db": round(finite[0], 2),
        "median_db": round(statistics.median(finite), 2),
        "max_db": round(finite[-1], 2),
        "worst": [(name, round(db, 2)) for name, db in values[:worst]],
    }


def quantization_report(pipe) -> dict:
    """Per quantised component: mode, layers quantised and kept, weight GiB now, probe SQNR summary."""
    from ..memory.weights import actual_weight_bytes  # here: engine.memory.weights imports engine.quant

    state: QuantState | None = getattr(pipe, "quant_state", None)
    if state is None:
        return {}
    report = {}
    for component, result in state.components.items():
        report[component] = {
            "mode": result.mode,
            "quantized_layers": len(result.quantized),
            "kept_layers": result.kept,
            "weight_gib": round(actual_weight_bytes(getattr(pipe, component)) / 2**30, 3),
            "sqnr": sqnr_summary(result.sqnr_db),
        }
    return report


def measure_layer_sqnr(model: nn.Module, mode: str, run: Callable[[], object], component: str = "transformer",
                       max_tokens: int = 1024) -> dict[str, float]:  # fmt: skip
    """Per-layer SQNR of `mode` on the activations `run()` actually feeds each quantisable Linear of `model`
    (bf16, before quantising): each layer is quantised on the fly in a hook, compared, and dropped."""
    results: dict[str, float] = {}

    def hook_for(name):
        def hook(module, args):
            x = args[0].reshape(-1, module.in_features)[:max_tokens]
            results[name] = min(results.get(name, math.inf), layer_sqnr(module, mode, x))

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in quantizable_linears(model, component)]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return results
