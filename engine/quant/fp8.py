"""The fp8 W8A8 arithmetic and its layers: Fp8Linear, and the placeholders FusedAway and KeepsInputDtype.

"fp8": W8A8 float8 e4m3. Weights per output channel (scale = amax / 448), activations per token,
dynamically: quantised by Fp8Linear itself, or, in the engine's fused blocks, by the kernel that makes them
(flux_kernels.layernorm_modulate.*_fp8, flux_kernels.gelu_fp8; Fp8Linear.forward(x_fp8, x_scale),
QuantConfig.fp8_fused_input).
On GPUs with FP8 tensor cores (compute capability >= 8.9) the matmul is `torch._scaled_mm` with row-wise
scales (fp32 accumulate, or the tensor cores' fast accumulation with QuantConfig.fp8_fast_accum; bf16 out,
bias fused); elsewhere on CUDA
the weight is stored in fp8 and dequantised for a bf16 matmul (a warning says so); on the CPU the
W8A8 arithmetic is emulated with the same fp8 values (the CPU tests test the arithmetic).
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from flux_kernels.fp8 import E4M3_MAX as E4M3_MAX  # re-exported: the tests and users read it here
from flux_kernels.fp8 import FP8_DTYPE, quantize_fp8_rowwise

from ..errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)


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


def fp8_input_linear(
    x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, compute: str, out_dtype: torch.dtype,
    fast_accum: bool = False,
) -> torch.Tensor:  # fmt: skip
    """x (e4m3 [..., K], fp32 per-token scales [..., 1]) @ weight.T [..., N] for a weight in a float dtype (a LoRA
    factor beside an fp8 layer: small, so quantised per row here, as a base weight is), computed the way an
    Fp8Linear of `compute` computes ('scaled_mm', 'emulate'); a width cuBLASLt cannot take (N % 16), or 'weight-only',
    from the dequantised activations in out_dtype."""
    leading, x_fp8, x_scale = x_fp8.shape[:-1], x_fp8.reshape(-1, x_fp8.shape[-1]), x_scale.reshape(-1, 1)
    if compute == "weight-only" or (compute == "scaled_mm" and weight.shape[0] % 16):
        out = F.linear(x_fp8.to(out_dtype) * x_scale.to(out_dtype), weight.to(out_dtype))
    else:
        weight_fp8, weight_scale = quantize_fp8_rowwise(weight)
        out = fp8_linear_quantized(
            x_fp8, x_scale, weight_fp8, weight_scale.view(-1), None, compute, out_dtype, fast_accum
        )  # fmt: skip
    return out.view(*leading, weight.shape[0])


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
    """Stands where a projection was before it was fused and quantised (it held a view of the bf16 weight).

    It knows where its rows went: `block`'s attribute `attr` (the fused, quantised layer), rows [start, stop), input
    width `in_features`; a LoRA adapter on it (engine.quant.lora) adds its update to those columns of the fused GEMM's
    output and merges into those rows. The block is held in a list, not as a submodule (it is this module's parent).
    `weight` is an empty tensor (no bytes, not saved) on the fused layer's device, in its compute dtype: what PEFT
    reads to place an adapter, as KeepsInputDtype's is for T5.
    """

    def __init__(
        self, fused_name: str, block: nn.Module | None = None, attr: str = "", start: int = 0, stop: int = 0,
        in_features: int = 0, like: torch.Tensor | None = None,
    ):  # fmt: skip
        super().__init__()
        self.fused_name, self.attr, self.start, self.stop = fused_name, attr, start, stop
        self.in_features, self.out_features = in_features, stop - start
        self._block = [block] if block is not None else []
        device, dtype = (like.device, like.dtype) if like is not None else (None, torch.bfloat16)
        self.register_buffer("weight", torch.empty(0, dtype=dtype, device=device), persistent=False)

    @property
    def block(self) -> nn.Module:
        if not self._block:
            raise ConfigError(f"this placeholder of a projection fused into `{self.fused_name}` has no block recorded")
        return self._block[0]

    def fused_layer(self) -> nn.Module:
        """The fused, quantised layer holding this projection's rows."""
        return getattr(self.block, self.attr)

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
        from ..memory.weights import state_tensors  # here: engine.memory.weights imports engine.quant

        super().__init__()
        self.inner = inner
        device = next((t.device for t in state_tensors(inner)), None)
        self.register_buffer("weight", torch.empty(0, dtype=dtype, device=device), persistent=False)

    def forward(self, x):
        return self.inner(x)
