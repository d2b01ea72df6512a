"""Which Linears are quantised, per pipeline component, and the modes: names and lists only, no module state.

Modes:
- "fp8": W8A8 float8 e4m3 (engine.quant.fp8: the arithmetic, Fp8Linear).
- "fp8-weight", "int8-weight": weight-only via optimum-quanto (qfloat8 / qint8, per output channel),
  bf16 compute.
- "nf4": bitsandbytes Linear4bit, NF4 blocks of 64, bf16 compute, optional double quantisation. CUDA only.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

NF4_BLOCK = 64
QUANTO_MODES = {"fp8-weight": "qfloat8", "int8-weight": "qint8"}
COMPONENTS = ("transformer", "text_encoder_2", "text_encoder")

# Linears that stay in the model's dtype, by the first part of their name. Measured with `layer_sqnr`, fp8 W8A8:
# - CPU, tiny model (same module classes), N(0, 1) probes of 256 tokens, 2026-11-26: block Linears (attention,
#   MLP, adaLN modulation) 28.6-29.1 dB; x_embedder 29.0, context_embedder 29.4, time_text_embed 28.8-29.6,
#   norm_out.linear 29.0, proj_out 28.8.
# - H100, synthetic flux-dev at its real shapes, probe SQNR of the 304 quantised Linears, 2026-11-26
#   (benchmarks/results/quant-h100-80gb-hbm3-*.json): 28.6-28.7 dB, adaLN modulation included.
# Random init shows no layer as more sensitive, so the list is the conventional one (torchao, diffusers): the
# layers that touch the model's inputs and outputs, where trained checkpoints carry outliers, 0.2% of the
# weights. The adaLN modulation linears (3.2B parameters, 27% of the weights) are quantised: keeping them in
# bf16 would put fp8 at 14.2 GiB, over the 11.5 GiB target, and they measured no worse than the rest.
# Re-measure on real weights (bench_quant's real-activation SQNR).
KEEP = {
    "transformer": ("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out"),
    "text_encoder_2": (),
    "text_encoder": (),
    # a FluxControlNetModel (engine/controlnet.py), quantised as the transformer it feeds: its blocks are the
    # transformer's classes; kept are the same input layers, the control image's embedder, and the zero-initialised
    # projections whose outputs are the residuals added into the transformer (its outputs, as proj_out is)
    "controlnet": (
        "x_embedder",
        "context_embedder",
        "time_text_embed",
        "controlnet_x_embedder",
        "controlnet_blocks",
        "controlnet_single_blocks",
    ),
}
# transformers' T5 casts its FF input to `wo.weight.dtype` (its _keep_in_fp32_modules hack, transformers issue
# 20287); quantised `wo` layers are wrapped so that read sees the compute dtype. T5's FF output has large
# activation outliers (the reason for that hack), so under "fp8" they compute weight-only: fp8 storage,
# bf16 activations.
T5_WO = "wo"

# the modules that engine/attention.py fuses, by fused name
FUSED_VIEWS = {
    "qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _is_kept(name: str, keep: tuple[str, ...]) -> bool:
    return name.split(".")[0] in keep


def quantizable_linears(model: nn.Module, component: str) -> Iterator[tuple[str, nn.Linear]]:
    keep = KEEP[component]
    return ((n, m) for n, m in model.named_modules() if type(m) is nn.Linear and not _is_kept(n, keep))


def kept_linears(model: nn.Module, component: str) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _is_kept(n, KEEP[component])]
