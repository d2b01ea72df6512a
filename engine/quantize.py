"""Weight quantisation per pipeline component: fp8 (W8A8), fp8 / int8 weight-only (optimum-quanto), nf4 (bitsandbytes).

`apply_quantization(pipe, QuantConfig)` replaces the Linear layers of the transformer, T5 (text_encoder_2)
and CLIP (text_encoder) in place, one layer at a time, so that each bf16 weight is freed as soon as its
quantised copy exists (the peak is the bf16 model loaded before it, plus one layer; quantising while loading,
below, avoids the bf16 model altogether).

Modes:
- "fp8": W8A8 float8 e4m3. Weights per output channel (scale = amax / 448), activations per token,
  dynamically: quantised by Fp8Linear itself, or, in the engine's fused blocks, by the kernel that makes them
  (flux_kernels.layernorm_modulate.*_fp8, flux_kernels.gelu_fp8; Fp8Linear.forward(x_fp8, x_scale),
  QuantConfig.fp8_fused_input).
  On GPUs with FP8 tensor cores (compute capability >= 8.9) the matmul is `torch._scaled_mm` with row-wise
  scales (fp32 accumulate, or the tensor cores' fast accumulation with QuantConfig.fp8_fast_accum; bf16 out,
  bias fused); elsewhere on CUDA
  the weight is stored in fp8 and dequantised for a bf16 matmul (a warning says so); on the CPU the
  W8A8 arithmetic is emulated with the same fp8 values (the CPU tests test the arithmetic).
- "fp8-weight", "int8-weight": weight-only via optimum-quanto (qfloat8 / qint8, per output channel),
  bf16 compute.
- "nf4": bitsandbytes Linear4bit, NF4 blocks of 64, bf16 compute, optional double quantisation. CUDA only.

The engine's fused projections (`qkv`, `txt_qkv`, `linear1`, from engine/attention.py) are what run, so
they are what gets quantised; the original to_q/to_k/to_v/add_*_proj/proj_mlp modules are views of the
fused bf16 weight and are replaced by `FusedAway` placeholders first, or they would keep it alive.
The other order works too: a model quantised before it is fused (quantised while loading, or loaded from a
quantised checkpoint) has its quantised projections concatenated row by row (`fuse_quantized_linears`),
which is exactly what quantising the fused weight gives (nf4 with double quantisation: up to the second-level
scales).

Quantise while loading: `engine.models.load_local_components(..., quant=QuantConfig(...))` builds each
quantised component on the meta device and hands each Linear to `LoadQuantizer` as its tensors are read, so the
device never holds the bf16 component (peak: quantised size + one layer); the per-layer step (`quantize_layer`)
is the one apply_quantization uses, so the result is identical, and apply_quantization then leaves it alone.

Quantised checkpoints: `save_quantized(pipe, folder)` writes a diffusers-layout folder whose transformer is
saved in fp8 (`save_fp8_transformer`'s file plus a marker); `load_local_components` / FluxEngine.from_pretrained
load it as saved. fp8 only: the quanto and nf4 modes are refused with a pointer to quantising while loading.

Random-init weights lack the outliers of trained ones: the SQNR figures here are a floor on what the
arithmetic does, not a measurement of a real checkpoint's fidelity.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import statistics
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flux_kernels.fp8 import E4M3_MAX as E4M3_MAX  # re-exported: the tests and users read it here
from flux_kernels.fp8 import FP8_DTYPE, quantize_fp8_rowwise

from .config import QuantConfig
from .errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

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
}
# transformers' T5 casts its FF input to `wo.weight.dtype` (its _keep_in_fp32_modules hack, transformers issue
# 20287); quantised `wo` layers are wrapped so that read sees the compute dtype. T5's FF output has large
# activation outliers (the reason for that hack), so under "fp8" they compute weight-only: fp8 storage,
# bf16 activations.
_T5_WO = "wo"

# the modules that engine/attention.py fuses, by fused name
FUSED_VIEWS = {
    "qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}


# ----------------------------------------------------------------------------- fp8 arithmetic


_compiled_quantizer: list = []  # [fn] once built; [None] if compiling it failed


def _quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8_rowwise for the scaled_mm path. Inside a compiled region inductor fuses it into the op
    before; in eager its six elementwise passes cost more than the fp8 GEMM saves (measured on an H100:
    Fp8Linear 0.565 ms vs bf16 0.486 ms at 4608x3072x12288, _scaled_mm alone 0.325 ms), so eager calls use
    one compiled copy of it (built on first use, dynamic shapes), and plain PyTorch if that cannot compile.
    With it: Fp8Linear 0.375 ms vs bf16 0.481 ms (H100, 2026-11-26, quant-h100-80gb-hbm3-20261126-1812.json)."""
    if torch.compiler.is_compiling():
        return quantize_fp8_rowwise(x)
    if not _compiled_quantizer:
        _compiled_quantizer.append(torch.compile(quantize_fp8_rowwise, dynamic=True, fullgraph=True))
    if _compiled_quantizer[0] is not None:
        try:
            return _compiled_quantizer[0](x)
        except Exception as err:  # noqa: BLE001 - a compiler failure must only cost speed
            logger.warning("compiling the fp8 activation quantiser failed (%s); using eager PyTorch", err)
            _compiled_quantizer[0] = None
    return quantize_fp8_rowwise(x)


def fp8_compute_for(device: torch.device) -> str:
    """'scaled_mm' on FP8 tensor cores (sm >= 8.9), 'weight-only' on older CUDA GPUs, 'emulate' on the CPU."""
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) >= (8, 9):
            return "scaled_mm"
        warnings.warn(
            f"{torch.cuda.get_device_name(device)} has no FP8 tensor cores (needs compute capability 8.9+): "
            "fp8 weights are stored in fp8 and dequantised for bf16 matmuls (half the weight memory, no speed-up)",
            stacklevel=3,
        )
        return "weight-only"
    return "emulate"


def fp8_layer_compute(device: torch.device, in_features: int, out_features: int, compute: str | None = None) -> str:
    """The compute path of one fp8 layer: `compute`, else the device's (fp8_compute_for); 'scaled_mm' needs K and N
    multiples of 16 (cuBLASLt), other shapes compute weight-only."""
    compute = compute or fp8_compute_for(device)
    if compute == "scaled_mm" and (in_features % 16 or out_features % 16):
        compute = "weight-only"
    return compute


def fp8_linear(
    x: torch.Tensor,
    weight_fp8: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    compute: str,
    fast_accum: bool = False,
) -> torch.Tensor:
    """x [M, K] @ (weight_fp8 [N, K] * weight_scale [N]).T + bias -> [M, N] in x's dtype."""
    if compute == "weight-only":
        weight = weight_fp8.to(x.dtype) * weight_scale.to(x.dtype)[:, None]
        return F.linear(x, weight, bias)
    x_fp8, x_scale = _quantize_activations(x) if compute == "scaled_mm" else quantize_fp8_rowwise(x)
    return fp8_linear_quantized(x_fp8, x_scale, weight_fp8, weight_scale, bias, compute, x.dtype, fast_accum)


def fp8_linear_quantized(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    weight_fp8: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    compute: str,
    out_dtype: torch.dtype,
    fast_accum: bool = False,
) -> torch.Tensor:
    """(x_fp8 [M, K] e4m3 * x_scale [M, 1]) @ (weight_fp8 [N, K] * weight_scale [N]).T + bias -> [M, N] in
    out_dtype, from activations already quantised per token (by quantize_fp8_rowwise, or by a norm kernel's fp8
    output). compute 'scaled_mm' (fast_accum: the tensor cores' fast accumulation, use_fast_accum) or 'emulate'."""
    if compute == "scaled_mm":
        out = torch._scaled_mm(
            x_fp8,
            weight_fp8.t(),  # [K, N], column-major as cuBLASLt wants
            scale_a=x_scale,
            scale_b=weight_scale.view(1, -1),
            bias=None if bias is None else bias.to(torch.bfloat16),
            out_dtype=torch.bfloat16,
            use_fast_accum=fast_accum,
        )
        return out.to(out_dtype)
    if compute != "emulate":
        raise ValueError(f"fp8_linear_quantized: compute={compute!r} takes no pre-quantised input; use fp8_linear")
    # emulate: products of the same fp8 values accumulated in fp32, then both scales, as the tensor cores do
    # (fast_accum has no CPU counterpart: the emulation always accumulates in fp32)
    out = (x_fp8.float() @ weight_fp8.float().t()) * x_scale * weight_scale.view(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


class Fp8Linear(nn.Module):
    """A Linear with e4m3 weights (per output channel scales) and dynamic per-token e4m3 activations.

    forward(x) quantises x itself; forward(x_fp8, x_scale) takes activations already quantised per token (the
    norm kernels' fp8 outputs: `takes_fp8_input` says whether this layer wants them). Run-time options, set by
    apply_quantization from the QuantConfig (not saved with the weights): `fast_accum` (the FP8 tensor cores'
    fast accumulation) and `fused_input` (accept pre-quantised activations).
    """

    COMPUTES = ("scaled_mm", "weight-only", "emulate")
    fast_accum = False
    fused_input = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True, compute: str = "emulate", device=None):
        super().__init__()
        if compute not in self.COMPUTES:
            raise ConfigError(f"Fp8Linear compute={compute!r} is not one of {self.COMPUTES}")
        self.in_features, self.out_features, self.compute = in_features, out_features, compute
        self.register_buffer("weight_fp8", torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute: str | None = None, name: str = "") -> Fp8Linear:
        weight = linear.weight.detach()
        compute = fp8_layer_compute(weight.device, linear.in_features, linear.out_features, compute)
        try:
            weight_fp8, weight_scale = quantize_fp8_rowwise(weight, check_finite=True)
        except ValueError as err:
            raise CheckpointError(f"layer {name or type(linear).__name__}: {err}") from err
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, compute, device="meta")
        module.weight_fp8 = weight_fp8
        module.weight_scale = weight_scale.view(-1)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return module

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_fp8.float() * self.weight_scale[:, None]

    @property
    def takes_fp8_input(self) -> bool:
        """Whether the block should hand this layer activations quantised by the kernel before it: on the FP8 tensor
        cores, or in the CPU emulation (not 'emulate' weights moved to a GPU: its Triton kernels may lack fp8)."""
        if not self.fused_input:
            return False
        return self.compute == "scaled_mm" or (self.compute == "emulate" and self.weight_fp8.device.type == "cpu")

    def forward(
        self, x: torch.Tensor, x_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype; or x e4m3 [..., K] with its fp32 per-token scales x_scale [..., 1]
        (pre-quantised) -> [..., N] in out_dtype (default: the bias's dtype, else bf16)."""
        leading = x.shape[:-1]
        if x_scale is None:
            if x.dtype == FP8_DTYPE:
                raise ValueError("Fp8Linear: an e4m3 input needs its per-token scales: call layer(x_fp8, x_scale)")
            x = x.reshape(-1, self.in_features)
            out = fp8_linear(x, self.weight_fp8, self.weight_scale, self.bias, self.compute, self.fast_accum)
        else:
            if (
                x.dtype != FP8_DTYPE
                or x.shape[-1] != self.in_features
                or x_scale.dtype != torch.float32
                or x_scale.shape != (*leading, 1)
            ):
                raise ValueError(
                    f"Fp8Linear: pre-quantised input must be {FP8_DTYPE} [..., {self.in_features}] with fp32 scales "
                    f"[..., 1]; got {x.dtype} {tuple(x.shape)} and {x_scale.dtype} scales {tuple(x_scale.shape)}"
                )
            if out_dtype is None:
                out_dtype = self.bias.dtype if self.bias is not None else torch.bfloat16
            out = fp8_linear_quantized(
                x.reshape(-1, self.in_features), x_scale.reshape(-1, 1), self.weight_fp8, self.weight_scale,
                self.bias, self.compute, out_dtype, self.fast_accum,
            )  # fmt: skip
        return out.view(*leading, self.out_features)

    def extra_repr(self) -> str:
        options = ", fast_accum=True" if self.fast_accum else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, compute={self.compute}{options}"


class FusedAway(nn.Module):
    """Stands where a projection was before it was fused and quantised (it held a view of the bf16 weight)."""

    def __init__(self, fused_name: str):
        super().__init__()
        self.fused_name = fused_name

    def forward(self, *args, **kwargs):
        raise ConfigError(
            f"this projection was fused into `{self.fused_name}` and quantised; it only runs inside the engine's "
            "fused blocks. Load a fresh pipeline for diffusers' own attention processors"
        )


class KeepsInputDtype(nn.Module):
    """Wraps a quantised layer for callers that cast their input to `.weight.dtype` (transformers' T5 `wo`):
    `weight` is an empty tensor of the compute dtype, so the input is left as it is. It is a real 0-element
    tensor on the layer's device (no bytes), not a meta one, so that `.to(device)` of the model still works."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner = inner
        device = next((t.device for t in _state_tensors(inner)), None)
        self.register_buffer("weight", torch.empty(0, dtype=dtype, device=device), persistent=False)

    def forward(self, x):
        return self.inner(x)


# ----------------------------------------------------------------------------- one layer per mode


def _quanto_linear(linear: nn.Linear, mode: str) -> nn.Module:
    from optimum import quanto
    from optimum.quanto.nn import QLinear

    qmodule = QLinear.from_module(linear, weights=getattr(quanto, QUANTO_MODES[mode]))
    qmodule.freeze()
    return qmodule


def _nf4_linear(linear: nn.Linear, double_quant: bool) -> nn.Module:
    device = linear.weight.device
    if device.type != "cuda":
        raise ConfigError(
            f"nf4 quantisation runs bitsandbytes' CUDA kernels; the model is on {device.type}. Use a CUDA GPU, "
            "or 'int8-weight' / 'fp8-weight' here"
        )
    return _nf4_module(linear, double_quant)


def _nf4_module(linear: nn.Linear, double_quant: bool) -> nn.Module:
    """bitsandbytes' Linear4bit of `linear` on its device (the CPU only for tests of the layout: bitsandbytes
    quantises there too, the engine does not run nf4 there)."""
    import bitsandbytes as bnb

    device = linear.weight.device
    module = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=linear.weight.dtype,
        compress_statistics=double_quant,
        quant_type="nf4",
        device="meta",
    )
    module.weight = bnb.nn.Params4bit(
        linear.weight.detach(), requires_grad=False, compress_statistics=double_quant, quant_type="nf4", module=module
    ).to(device)  # the move quantises (bitsandbytes' design): from the weight already on `device`
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return module


def quantized_linear(
    linear: nn.Linear, mode: str, name: str = "", double_quant: bool = False, fp8_compute: str | None = None
) -> nn.Module:
    """A quantised copy of `linear` (the original is left as it is)."""
    if mode == "fp8":
        return Fp8Linear.from_linear(linear, compute=fp8_compute, name=name)
    if mode in QUANTO_MODES:
        return _quanto_linear(linear, mode)
    if mode == "nf4":
        return _nf4_linear(linear, double_quant)
    raise ConfigError(f"quantisation mode {mode!r} is not one of {', '.join(QuantConfig.MODES[1:])}")


def layer_sqnr(linear: nn.Linear, mode: str, inputs: torch.Tensor, double_quant: bool = False) -> float:
    """SQNR (dB) of `linear` quantised with `mode` against its own output on `inputs`, computed in fp32."""
    from .measure import sqnr_db

    with torch.no_grad():
        reference = F.linear(
            inputs.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float()
        )
        quantized = quantized_linear(linear, mode, double_quant=double_quant)(inputs.to(linear.weight.dtype))
    return sqnr_db(quantized.float(), reference)


def _probe(in_features: int, like: torch.Tensor, tokens: int = 64) -> torch.Tensor:
    generator = torch.Generator(device=like.device).manual_seed(in_features)
    return torch.randn(tokens, in_features, generator=generator, device=like.device, dtype=like.dtype)


# ----------------------------------------------------------------------------- a component


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def drop_fused_views(model: nn.Module) -> list[str]:
    """Replace the projections that view a fused Linear's weight (engine/attention.py) by FusedAway."""
    dropped = []
    for block_name, block in model.named_modules():
        for fused_name, views in FUSED_VIEWS.items():
            fused = getattr(block, fused_name, None)
            if type(fused) is not nn.Linear or not all(_has_linear(block, view) for view in views):
                continue
            for view in views:
                parent, child = _parent(block, view)
                setattr(parent, child, FusedAway(f"{block_name}.{fused_name}"))
                dropped.append(f"{block_name}.{view}")
    return dropped


def fuse_quantized_linears(parts: list[nn.Module], name: str = "") -> nn.Module:
    """One quantised Linear computing all of `parts` (outputs concatenated), for engine/attention.py's fused
    projections when the model was quantised before fusing (quantised while loading, or a quantised checkpoint).

    Every mode scales per output row (fp8, quanto) or per block of 64 within a row (nf4), so the fused layer is
    exactly what quantising the fused bf16 weight gives: the rows are concatenated, nothing is re-quantised.
    The one exception is nf4 with double quantisation, whose per-block scales are themselves quantised in
    groups of 256 across the whole weight: they are dequantised, concatenated and quantised again (the 4-bit
    codes are unchanged; the scales differ from the bf16 path by that second rounding).
    """
    kinds = {_quantized_kind(part) for part in parts}
    in_features = {part.in_features for part in parts}
    if len(kinds) != 1 or None in kinds:
        found = ", ".join(sorted({type(part).__name__ for part in parts}))
        raise ConfigError(
            f"cannot fuse the projections of `{name}`: they are {found}; fusing needs all of them quantised the "
            "same way (or none). Load the model again with one QuantConfig for the transformer"
        )
    if len(in_features) != 1 or any(part.bias is None for part in parts):
        raise ConfigError(f"cannot fuse the projections of `{name}`: they need the same input width and biases")
    kind = kinds.pop()
    bias = torch.cat([part.bias.detach() for part in parts])
    if kind == "fp8":
        fused = _fuse_fp8(parts)
    elif kind in QUANTO_MODES:
        fused = _fuse_quanto(parts)
    else:
        fused = _fuse_nf4(parts, name)
    fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused


def _fuse_fp8(parts: list[Fp8Linear]) -> Fp8Linear:
    weight_fp8 = torch.cat([part.weight_fp8 for part in parts])  # [sum(N), K]
    in_features, out_features = parts[0].in_features, weight_fp8.shape[0]
    compute = fp8_layer_compute(weight_fp8.device, in_features, out_features)  # what from_linear picks for it
    fused = Fp8Linear(in_features, out_features, bias=True, compute=compute, device="meta")
    fused.weight_fp8 = weight_fp8
    fused.weight_scale = torch.cat([part.weight_scale for part in parts])
    return fused


def _plain_qbytes(weight):
    """quanto's kernel-agnostic WeightQBytesTensor of a weight (its CUDA Marlin fp8 packing undone)."""
    from optimum.quanto.tensor.weights import WeightQBytesTensor

    return weight if type(weight) is WeightQBytesTensor else weight.weight_qbytes_tensor()


def _fuse_quanto(parts: list[nn.Module]) -> nn.Module:
    from optimum.quanto.nn import QLinear
    from optimum.quanto.tensor.weights import WeightQBytesTensor

    weights = [_plain_qbytes(part.weight) for part in parts]
    data = torch.cat([w._data for w in weights])  # [sum(N), K] int8 / float8
    scale = torch.cat([w._scale for w in weights])  # [sum(N), 1]
    out_features, in_features = data.shape
    with torch.device("meta"):
        shape = nn.Linear(in_features, out_features, bias=True, dtype=weights[0].dtype)
    fused = QLinear.qcreate(shape, weights=parts[0].weight_qtype, device="meta")  # as QLinear.from_module does
    fused.input_scale = parts[0].input_scale.clone()
    fused.output_scale = parts[0].output_scale.clone()
    weight = WeightQBytesTensor.create(
        weights[0].qtype, 0, size=data.shape, stride=data.stride(), data=data, scale=scale,
        activation_qtype=weights[0].activation_qtype,
    )  # fmt: skip
    fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused


def _fuse_nf4(parts: list[nn.Module], name: str) -> nn.Module:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_f

    states = [part.weight.quant_state for part in parts]
    blocksize, nested = states[0].blocksize, states[0].nested
    for part, state in zip(parts, states, strict=True):
        if (part.out_features * part.in_features) % blocksize or state.nested != nested:
            raise ConfigError(
                f"cannot fuse the nf4 projections of `{name}`: a {part.out_features}x{part.in_features} weight is not "
                f"a whole number of {blocksize}-element blocks (or they differ in double quantisation); use the "
                "unfused attention (AttentionConfig(backend='sdpa', fused_norms=False)) for this model"
            )
    packed = torch.cat([part.weight.data.reshape(-1) for part in parts]).reshape(-1, 1)  # 2 codes per byte
    if nested:
        absmax = torch.cat([bnb_f.dequantize_blockwise(s.absmax, s.state2) + s.offset for s in states])
        offset = absmax.mean()
        absmax, state2 = bnb_f.quantize_blockwise(absmax - offset, blocksize=256)  # as quantize_4bit does
    else:
        absmax, offset, state2 = torch.cat([s.absmax for s in states]), None, None
    out_features, in_features = sum(part.out_features for part in parts), parts[0].in_features
    state = bnb_f.QuantState(
        absmax=absmax, shape=torch.Size((out_features, in_features)), code=states[0].code, blocksize=blocksize,
        quant_type=states[0].quant_type, dtype=states[0].dtype, offset=offset, state2=state2,
    )  # fmt: skip
    fused = bnb.nn.Linear4bit(
        in_features, out_features, bias=True, compute_dtype=parts[0].compute_dtype, compress_statistics=nested,
        quant_type=states[0].quant_type, device="meta",
    )  # fmt: skip
    fused.weight = bnb.nn.Params4bit(
        packed, requires_grad=False, quant_state=state, blocksize=blocksize, compress_statistics=nested,
        quant_type=states[0].quant_type, quant_storage=packed.dtype, module=fused, bnb_quantized=True,
    )  # fmt: skip
    fused.quant_state = state
    return fused


def _has_linear(module: nn.Module, name: str) -> bool:
    try:
        return isinstance(module.get_submodule(name), nn.Linear)
    except AttributeError:
        return False


def _is_kept(name: str, keep: tuple[str, ...]) -> bool:
    return name.split(".")[0] in keep


def quantizable_linears(model: nn.Module, component: str) -> Iterator[tuple[str, nn.Linear]]:
    keep = KEEP[component]
    return ((n, m) for n, m in model.named_modules() if type(m) is nn.Linear and not _is_kept(n, keep))


def kept_linears(model: nn.Module, component: str) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _is_kept(n, KEEP[component])]


@dataclass
class ComponentQuant:
    """What quantising one component did: its mode, the layers it replaced and kept, probe SQNR per layer."""

    mode: str
    quantized: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    fused_away: list[str] = field(default_factory=list)
    sqnr_db: dict[str, float] = field(default_factory=dict)


def quantize_model(
    model: nn.Module, mode: str, component: str = "transformer", double_quant: bool = False, record_sqnr: bool = True
) -> ComponentQuant:
    """Replace `model`'s Linears by `mode` layers in place, one at a time (each bf16 weight freed as it goes).

    record_sqnr: per layer, the output SQNR on a N(0, 1) probe of 64 tokens (cheap: one small matmul
    per layer while the bf16 weight still exists).
    """
    result = ComponentQuant(mode=mode, kept=kept_linears(model, component))
    result.fused_away = drop_fused_views(model)
    for name in [n for n, _ in quantizable_linears(model, component)]:  # names: a module list would pin them all
        linear = model.get_submodule(name)
        parent, child = _parent(model, name)
        setattr(parent, child, quantize_layer(linear, name, mode, component, double_quant, result, record_sqnr))
        del linear  # the last reference to the bf16 weight: freed here, not at the end
    mark_quantized(model, result, double_quant)
    return result


def quantize_layer(
    linear: nn.Linear,
    name: str,
    mode: str,
    component: str,
    double_quant: bool = False,
    record: ComponentQuant | None = None,
    record_sqnr: bool = True,
) -> nn.Module:
    """The quantised module that replaces the Linear `name` of `component`: the one per-layer step of both
    `quantize_model` (after loading) and the loader's quantise-while-loading (engine.models), so the two give
    identical modules. `record` collects the name and, with record_sqnr, the probe SQNR (one 64-token matmul
    while the bf16 weight still exists)."""
    is_t5_wo = component == "text_encoder_2" and name.rpartition(".")[2] == _T5_WO
    compute = "weight-only" if (is_t5_wo and mode == "fp8" and linear.weight.is_cuda) else None
    with torch.no_grad():
        qmodule = quantized_linear(linear, mode, name=name, double_quant=double_quant, fp8_compute=compute)
        if record is not None and record_sqnr:
            from .measure import sqnr_db

            probe = _probe(linear.in_features, linear.weight)
            record.sqnr_db[name] = sqnr_db(qmodule(probe).float(), linear(probe).float())
    if is_t5_wo and mode in ("fp8", "nf4"):
        qmodule = KeepsInputDtype(qmodule, linear.weight.dtype)
    if record is not None:
        record.quantized.append(name)
    return qmodule


def mark_quantized(model: nn.Module, record: ComponentQuant, double_quant: bool = False) -> None:
    """Tag `model` as quantised (apply_quantization then leaves it alone) and keep what quantising it did."""
    model._flux_quant_mode = record.mode
    model._flux_nf4_double_quant = double_quant
    model._flux_quant_record = record


class LoadQuantizer:
    """Quantises a component's Linears one at a time as engine.models' streamed loader fills them
    (`load_local_components(..., quant=QuantConfig(...))`), with the same per-layer step and kept list as
    apply_quantization, so the loaded component is identical to loading it whole and quantising it."""

    def __init__(self, component: str, mode: str, double_quant: bool = False, record_sqnr: bool = True):
        if component not in COMPONENTS or mode not in QuantConfig.MODES[1:]:
            raise ConfigError(
                f"cannot quantise {component!r} as {mode!r} while loading; components: {', '.join(COMPONENTS)}, "
                f"modes: {', '.join(QuantConfig.MODES[1:])}"
            )
        self.component, self.mode, self.double_quant, self.record_sqnr = component, mode, double_quant, record_sqnr
        self.record = ComponentQuant(mode=mode)

    def layer_names(self, model: nn.Module) -> set[str]:
        """The Linears to quantise (on the meta-device model, before any weight is read)."""
        self.record.kept = kept_linears(model, self.component)
        return {name for name, _ in quantizable_linears(model, self.component)}

    def __call__(self, name: str, linear: nn.Linear) -> nn.Module:
        return quantize_layer(
            linear, name, self.mode, self.component, self.double_quant, self.record, self.record_sqnr
        )  # fmt: skip

    def finish(self, model: nn.Module) -> None:
        mark_quantized(model, self.record, self.double_quant)


def quant_mode_of(model: nn.Module | None) -> str | None:
    """The mode `model` is quantised in (its tag, else its layers' types), or None for an unquantised model."""
    if model is None:
        return None
    mode = getattr(model, "_flux_quant_mode", None)
    if mode is not None:
        return mode
    for module in model.modules():
        kind = _quantized_kind(module)
        if kind is not None:
            return kind
    return None


def is_quantized_layer(module: nn.Module) -> bool:
    """A quantised Linear (ours, optimum-quanto's or bitsandbytes' 4-bit), wrapped or not."""
    return _quantized_kind(module) is not None


def _quantized_kind(module: nn.Module) -> str | None:
    """'fp8', 'fp8-weight', 'int8-weight' or 'nf4' for a quantised Linear of ours or of the libraries; else None.
    The libraries are looked up only when already imported (a model holding their layers has imported them)."""
    if isinstance(module, KeepsInputDtype):
        module = module.inner
    if isinstance(module, Fp8Linear):
        return "fp8"
    quanto_nn = sys.modules.get("optimum.quanto.nn")
    if quanto_nn is not None and isinstance(module, quanto_nn.QLinear):
        return "fp8-weight" if "float8" in getattr(module.weight_qtype, "name", "") else "int8-weight"
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    if bnb_nn is not None and isinstance(module, bnb_nn.Linear4bit):
        return "nf4"
    return None


@dataclass
class QuantState:
    """What apply_quantization did, per component."""

    config: QuantConfig
    components: dict[str, ComponentQuant] = field(default_factory=dict)


def apply_quantization(pipe, config: QuantConfig) -> QuantState | None:
    """Quantise the pipeline's components per `config`; None when every component is 'none'.

    A component already quantised in the same mode (quantised while loading, or loaded from a quantised
    checkpoint) is left as it is: optimize() after a quantised load does not quantise twice.
    """
    if all(getattr(config, c) == "none" for c in COMPONENTS):
        return None
    state = QuantState(config=config)
    for component in COMPONENTS:
        mode = getattr(config, component)
        model = getattr(pipe, component, None)
        if mode == "none" or model is None:
            continue
        previous = quant_mode_of(model)
        if previous is None:
            state.components[component] = quantize_model(model, mode, component, config.nf4_double_quant)
            set_fp8_options(model, config)
            continue
        if previous != mode:
            raise ConfigError(
                f"{component} is already quantised as {previous!r}; load it again (unquantised, or with "
                f"QuantConfig({component}={mode!r}) to quantise while loading) to use {mode!r}"
            )
        double_quant = getattr(model, "_flux_nf4_double_quant", config.nf4_double_quant)
        if mode == "nf4" and double_quant != config.nf4_double_quant:
            raise ConfigError(
                f"{component} is already quantised as nf4 with nf4_double_quant={double_quant}; the config asks "
                f"{config.nf4_double_quant}: load it again with the config's QuantConfig"
            )
        record = getattr(model, "_flux_quant_record", None)
        state.components[component] = record or ComponentQuant(
            mode=mode, kept=kept_linears(model, component), quantized=_quantized_names(model)
        )
        set_fp8_options(model, config)
    return state


def set_fp8_options(model: nn.Module, config: QuantConfig) -> None:
    """The config's run-time fp8 options on every Fp8Linear of `model` (they are not part of the weights)."""
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.fast_accum, module.fused_input = config.fp8_fast_accum, config.fp8_fused_input


def _quantized_names(model: nn.Module) -> list[str]:
    names, wrapped = [], set()
    for name, module in model.named_modules():
        if id(module) not in wrapped and _quantized_kind(module) is not None:
            names.append(name)
            if isinstance(module, KeepsInputDtype):
                wrapped.add(id(module.inner))
    return names


# ----------------------------------------------------------------------------- memory accounting


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def nf4_layer_bytes(out_features: int, in_features: int, double_quant: bool) -> int:
    """Bytes bitsandbytes holds for one NF4 weight (bias not included), as bitsandbytes 0.50 allocates them:
    packed 4-bit values, per-64-block fp32 absmax (or, double-quantised, uint8 absmax + fp32 absmax per 256
    blocks + a 256-entry fp32 code + an fp32 offset), and the 16-entry fp32 NF4 code."""
    elements = out_features * in_features
    blocks = math.ceil(elements / NF4_BLOCK)
    packed = math.ceil(elements / 2)
    nf4_code = 16 * 4
    if double_quant:
        return packed + blocks + math.ceil(blocks / 256) * 4 + 256 * 4 + 4 + nf4_code
    return packed + blocks * 4 + nf4_code


def linear_weight_bytes(linear: nn.Linear, mode: str, double_quant: bool = False) -> int:
    """Bytes of one Linear (weight and bias) after quantising it with `mode`."""
    out_features, in_features = linear.out_features, linear.in_features
    bias = _tensor_bytes(linear.bias) if linear.bias is not None else 0
    dtype_bytes = linear.weight.element_size()
    if mode == "none":
        return out_features * in_features * dtype_bytes + bias
    if mode == "fp8":
        return out_features * in_features + out_features * 4 + bias  # e4m3 + fp32 scale per row
    if mode in QUANTO_MODES:
        # 1-byte data + a scale per row in the weight's dtype + quanto's scalar input/output scales
        return out_features * in_features + out_features * dtype_bytes + 2 * dtype_bytes + bias
    if mode == "nf4":
        return nf4_layer_bytes(out_features, in_features, double_quant) + bias
    raise ConfigError(f"quantisation mode {mode!r} is not one of {', '.join(QuantConfig.MODES)}")


def weight_bytes(model: nn.Module, mode: str, component: str = "transformer", double_quant: bool = False) -> int:
    """Exact bytes of `model`'s weights once quantised with `mode` (build it on the meta device: no memory).

    The diffusers (unfused) layout; fusing QKV changes nothing for fp8 and int8/fp8-weight scales per
    row, and a few hundred bytes per fused layer for nf4's block padding and codes.
    """
    targets = dict(quantizable_linears(model, component)) if mode != "none" else {}
    total, seen = 0, set()
    for name, module in model.named_modules():
        if name in targets:
            total += linear_weight_bytes(module, mode, double_quant)
            seen.update(id(p) for p in module.parameters())
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += _tensor_bytes(tensor)
    return total


def _leaf_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors behind a tensor subclass (quanto's QBytesTensor, its CUDA packed variants), recursively."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, nn.Parameter):
        yield tensor
        return
    for inner in flatten()[0]:
        yield from _leaf_tensors(getattr(tensor, inner))


def _state_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor a module holds, quanto's inner tensors and bitsandbytes' quant states included."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        yield from _leaf_tensors(tensor)
        quant_state = getattr(tensor, "quant_state", None)
        while quant_state is not None:
            yield from (t for t in (quant_state.absmax, quant_state.code, quant_state.offset) if t is not None)
            quant_state = quant_state.state2


def actual_weight_bytes(model: nn.Module) -> int:
    """Bytes of the tensors `model` holds now, each storage counted once."""
    total, seen = 0, set()
    for tensor in _state_tensors(model):
        try:
            key, nbytes = (tensor.device, tensor.untyped_storage().data_ptr()), tensor.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # meta tensors, storage-less wrappers
            key, nbytes = id(tensor), _tensor_bytes(tensor)
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total


def meta_component(variant: str, component: str, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A pipeline component of `variant` on the meta device (shapes and dtypes, no memory)."""
    from .models.builders import build_clip, build_t5, build_transformer, dtype_as_default
    from .models.variants import variant_spec

    spec = variant_spec(variant)
    with torch.device("meta"), dtype_as_default(dtype):
        if component == "transformer":
            return build_transformer(spec)
        if component == "text_encoder_2":
            return build_t5(spec, dtype)
        if component == "text_encoder":
            return build_clip(spec, dtype)
    raise ConfigError(f"component {component!r} is not one of {', '.join(COMPONENTS)}")


# ----------------------------------------------------------------------------- save / load (fp8)

FP8_FORMAT = "flux-engine-fp8/1"
# a folder written by save_quantized: transformer/QUANT_MARKER says how transformer/QUANT_WEIGHTS was saved
QUANT_MARKER = "flux_engine_quant.json"
QUANT_WEIGHTS = "flux-engine-fp8.safetensors"


def _unsupported_save(mode: str) -> ConfigError:
    return ConfigError(
        f"saving a transformer quantised as {mode!r} is not supported yet; use 'fp8' (QuantConfig(transformer="
        f"'fp8')) to save one, or keep the bf16 checkpoint and load it with quant=QuantConfig(transformer={mode!r}): "
        "it is then quantised while loading, one layer at a time, without a full-size peak"
    )


def _unfused_names(block_name: str, fused_child: str, module: Fp8Linear, block: nn.Module) -> list[tuple[str, int]]:
    """(diffusers name, rows) of each projection a fused fp8 Linear computes."""
    views = FUSED_VIEWS[fused_child]
    sizes = [block.attn.inner_dim] * len(views)  # q, k, v (image or text stream) are each heads * head_dim
    if "proj_mlp" in views:
        sizes[-1] = module.out_features - sum(sizes[:-1])
    return [(f"{block_name}.{v}" if block_name else v, s) for v, s in zip(views, sizes, strict=True)]


def save_fp8_transformer(transformer: nn.Module, path: str | Path) -> Path:
    """Write an fp8-quantised transformer to one safetensors file (e4m3 weights, fp32 scales, the rest as is).

    Fused projections are saved split back into the diffusers names: their scales are per row, so the
    split is exact, and the file loads into the plain diffusers layout (fused again, exactly, by the
    fused-attention presets).
    """
    from safetensors.torch import save_file

    mode = quant_mode_of(transformer)
    if mode is not None and mode != "fp8":
        raise _unsupported_save(mode)
    if mode is None:
        raise ConfigError(
            "save_fp8_transformer takes a transformer quantised with mode 'fp8' (QuantConfig(transformer='fp8')); "
            "this one is not quantised: save it with save_pretrained"
        )
    state, fp8_layers = {}, []
    modules = dict(transformer.named_modules())
    for name, tensor in transformer.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        module = modules.get(module_name)
        if not isinstance(module, Fp8Linear):
            state[name] = tensor
            continue
        block_name, _, child = module_name.rpartition(".")
        if child in FUSED_VIEWS and block_name and isinstance(getattr(modules[block_name], child, None), Fp8Linear):
            offset = 0
            for target, rows in _unfused_names(block_name, child, module, modules[block_name]):
                state[f"{target}.{leaf}"] = tensor[offset : offset + rows]
                offset += rows
        else:
            state[name] = tensor
    for name in state:
        if name.endswith(".weight_fp8"):
            fp8_layers.append(name.removesuffix(".weight_fp8"))
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    config = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    metadata = {"format": FP8_FORMAT, "config": json.dumps(config), "fp8_layers": json.dumps(sorted(fp8_layers))}
    path = Path(path)
    save_file(state, str(path), metadata=metadata)
    return path


def load_fp8_transformer(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16):
    """The FluxTransformer2DModel of a `save_fp8_transformer` file, fp8 layers rebuilt, nothing re-quantised.

    Built on the meta device and read one tensor at a time straight to `device` (no host copy of the file).
    Tensors other than the fp8 weights and their scales are cast to `dtype`.
    """
    from diffusers import FluxTransformer2DModel

    from .models.builders import dtype_as_default
    from .models.safetensors_io import SafetensorsReader, stream_into

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist; pass the path of a local .safetensors")
    device = torch.device(device)
    with SafetensorsReader([path]) as reader:
        metadata = reader.metadata()
        if metadata.get("format") != FP8_FORMAT:
            raise CheckpointError(
                f"{str(path)!r} is not a flux-engine fp8 checkpoint (format {metadata.get('format')!r}, expected "
                f"{FP8_FORMAT!r}); write one with engine.quantize.save_fp8_transformer"
            )
        with torch.device("meta"), dtype_as_default(dtype):
            transformer = FluxTransformer2DModel.from_config(json.loads(metadata["config"]))
            for name in json.loads(metadata["fp8_layers"]):
                linear = transformer.get_submodule(name)
                compute = fp8_layer_compute(device, linear.in_features, linear.out_features)
                parent, child = _parent(transformer, name)
                fp8 = Fp8Linear(linear.in_features, linear.out_features, linear.bias is not None, compute, "meta")
                setattr(parent, child, fp8)
        stream_into(transformer, reader, device, lambda key, meta: meta.dtype, source=str(path))
    record = ComponentQuant(mode="fp8", kept=kept_linears(transformer, "transformer"))
    record.quantized = [n for n, m in transformer.named_modules() if isinstance(m, Fp8Linear)]
    mark_quantized(transformer, record)
    return transformer


# ----------------------------------------------------------------------------- quantised pipeline folders


def save_quantized(pipe, folder: str | Path) -> Path:
    """Write `pipe` as a diffusers-layout folder with its transformer saved quantised, loadable without
    quantising again by `FluxEngine.from_pretrained(folder, config=...)` / `load_local_components(folder, ...)`.

    The other components are written by diffusers' save_pretrained; the transformer folder holds its config.json,
    the fp8 weights (QUANT_WEIGHTS, save_fp8_transformer's format: diffusers names, fused projections split) and
    a marker (QUANT_MARKER) that the loader looks for. Plain diffusers cannot load the transformer of such a
    folder. Supported: a transformer in 'fp8' with unquantised text encoders (quantise those while loading).
    """
    from diffusers import FluxPipeline

    folder = Path(folder)
    transformer = pipe.transformer
    mode = quant_mode_of(transformer)
    if mode is None:
        raise ConfigError(
            "save_quantized writes a quantised transformer; this pipeline's is not quantised. Save it with "
            "pipe.save_pretrained(folder), or optimise it with QuantConfig(transformer='fp8') first"
        )
    if mode != "fp8":
        raise _unsupported_save(mode)
    for component in ("text_encoder", "text_encoder_2"):
        encoder_mode = quant_mode_of(getattr(pipe, component, None))
        if encoder_mode is not None:
            raise ConfigError(
                f"save_quantized writes the text encoders unquantised, and {component} is quantised as "
                f"{encoder_mode!r}; save from a pipeline whose text encoders are not quantised and load with "
                f"quant=QuantConfig({component}={encoder_mode!r}) (quantised while loading, no full-size peak)"
            )
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(
            f"save_quantized writes a new folder; {str(folder)!r} exists and is not empty: pass a new path"
        )
    rest = FluxPipeline(**{**pipe.components, "transformer": None})
    with _diffusers_quiet():  # it logs that the (absent) transformer "cannot be saved": written below
        rest.save_pretrained(str(folder))
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["transformer"] = ["diffusers", type(transformer).__name__]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    transformer_dir = folder / "transformer"
    transformer_dir.mkdir(parents=True, exist_ok=True)
    transformer.save_config(str(transformer_dir))
    save_fp8_transformer(transformer, transformer_dir / QUANT_WEIGHTS)
    marker = {"format": FP8_FORMAT, "mode": mode, "weights": QUANT_WEIGHTS}
    (transformer_dir / QUANT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return folder


@contextlib.contextmanager
def _diffusers_quiet():
    from diffusers.utils import logging as diffusers_logging

    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(previous)


def saved_quantization(folder: str | Path) -> dict | None:
    """The marker of a folder written by save_quantized ({'format', 'mode', 'weights'}), or None for a plain one."""
    marker = Path(folder) / "transformer" / QUANT_MARKER
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{str(marker)!r} is not readable JSON ({err}); save the folder again") from err
    if info.get("format") != FP8_FORMAT:
        raise CheckpointError(
            f"{str(marker)!r} names format {info.get('format')!r}; this engine reads {FP8_FORMAT!r}: save the "
            "folder again with engine.quantize.save_quantized"
        )
    return info


def load_saved_quantized_transformer(folder: str | Path, device, dtype: torch.dtype, quant: QuantConfig | None = None):
    """The quantised transformer of a save_quantized folder (None for a plain folder), as saved. `quant` may ask
    for the saved mode or 'none' for the transformer (it runs quantised either way); another mode is refused."""
    info = saved_quantization(folder)
    if info is None:
        return None
    wanted = quant.transformer if quant is not None else "none"
    if wanted not in ("none", info["mode"]):
        raise ConfigError(
            f"{str(folder)!r} holds a transformer saved quantised as {info['mode']!r}; the config asks "
            f"{wanted!r}, which cannot be made from it. Use QuantConfig(transformer={info['mode']!r}), or load "
            "the bf16 folder"
        )
    if quant is not None and wanted == "none":
        logger.warning("%s holds an %s transformer: it runs quantised although the config asks 'none'", folder,
                       info["mode"])  # fmt: skip
    return load_fp8_transformer(Path(folder) / "transformer" / info["weights"], device=device, dtype=dtype)


# ----------------------------------------------------------------------------- reports


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
