"""An adapter's low-rank update as the engine computes it beside its fused and fp8 projections:
out[..., columns] += B(A(x)) * scaling, for each acting adapter, in PEFT's order, with
- the A factors of every part of a fused GEMM (and every adapter) run as one GEMM: x is read once, not once a part;
- beside an fp8 projection that takes the norm / GELU kernel's e4m3 activations, A reads those same activations
  through the same fp8 path as the base GEMM (A quantised per row, as a base weight is): the blocks keep their fused
  fp8 kernels with an adapter acting, and the update sees the activations the base sees;
- B's product added into its columns of the output: beside an fp8 base, accumulated in place by one cuBLAS GEMM
  (lora_addmm_: 3.9 ms a step faster at 1024^2, 12 at 2048^2 on the fastest preset, NOTES 2026-11-30 09:50); beside
  a bf16 base, PEFT's add (the in-place GEMM measured slower there under kernels-compile: 163 against 143 ms a step
  at 1024^2, NOTES 2026-11-29 evening).
Measured on an H200 (benchmarks/NOTES.md, 2026-11-29 evening): without the fp8 input, the fp8 preset's rank-64
adapter cost 27 ms of a 85 ms step at 1024^2, 17 of them in the fp8 fusions the adapted projections lost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def acting_adapters(layer: nn.Module) -> list[str]:
    """The adapters whose update a PEFT layer's forward would add now (PEFT's rules: none when disabled or merged)."""
    if layer.disable_adapters or layer.merged:
        return []
    return [name for name in layer.active_adapters if name in layer.lora_A]


def plain_adapters(updates: list[tuple[nn.Module, str]]) -> bool:
    """Whether every (layer, adapter) is a plain LoRA whose A factors can run as one GEMM (no dropout acting, no bias,
    one dtype); else each runs through its own modules, as PEFT runs it."""
    downs = [layer.lora_A[name] for layer, name in updates]
    return len({down.weight.dtype for down in downs}) <= 1 and all(
        down.bias is None and (isinstance(layer.lora_dropout[name], nn.Identity) or not layer.training)
        for (layer, name), down in zip(updates, downs, strict=True)
    )


def down_projection(
    updates: list[tuple[nn.Module, str]], x: torch.Tensor, x_scale: torch.Tensor | None = None, fp8=None
) -> list[torch.Tensor]:
    """A(x) of each (layer, adapter) (plain adapters: one GEMM over their concatenated A factors). x_scale: x is e4m3
    with these per-token scales, and `fp8` the Fp8Linear whose arithmetic A uses (engine.quant.fp8.fp8_input_linear)."""
    if not updates:
        return []
    downs = [layer.lora_A[name] for layer, name in updates]
    if x_scale is None and not plain_adapters(updates):
        return [down(layer.lora_dropout[name](x.to(down.weight.dtype))) for (layer, name), down in
                zip(updates, downs, strict=True)]  # fmt: skip
    weight = torch.cat([down.weight for down in downs])
    if x_scale is None:
        hidden = F.linear(x.to(weight.dtype), weight)
    else:
        from .quant.fp8 import fp8_input_linear

        hidden = fp8_input_linear(x, x_scale, weight, fp8.compute, weight.dtype, fp8.fast_accum)
    return list(hidden.split([down.out_features for down in downs], dim=-1))


def scaled(update: torch.Tensor, scaling) -> torch.Tensor:
    """update * scaling with PEFT's arithmetic for a float scale (a bf16 tensor times a Python float computes in
    fp32 and rounds once), also when the scale is a tensor (a float64 one under compile, engine.lora
    .scalings_as_tensors), which a plain product would first round to the update's dtype."""
    if isinstance(scaling, torch.Tensor):
        return update.float() * scaling
    return update * scaling


@torch.library.custom_op("flux_engine::lora_addmm_", mutates_args=("out",))
def lora_addmm_(out: torch.Tensor, low: torch.Tensor, up: torch.Tensor, start: int) -> None:
    """out[..., start : start + up rows] += low @ up.T in place, one cuBLAS GEMM with beta = 1 (fp32 accumulation,
    one rounding). out: contiguous [..., N]; low: [..., r] in out's dtype; up: [n, r]."""
    columns = out.view(-1, out.shape[-1])[:, start : start + up.shape[0]]
    columns.addmm_(low.reshape(-1, low.shape[-1]), up.t().to(out.dtype))


@lora_addmm_.register_fake
def _(out, low, up, start):
    return None


def add_update(
    out: torch.Tensor, start: int, layer: nn.Module, name: str, low: torch.Tensor, in_place: bool = False
) -> torch.Tensor:
    """out[..., start : start + width] += B(low) * scaling, into the fused output; returns out. in_place (beside
    an fp8 base, whose e4m3 input the update shares): B's product accumulated into out by one cuBLAS GEMM
    (lora_addmm_), so out is read and written once instead of an update being written, read back and added. The
    scaled low-rank activations are rounded to out's dtype before it, and the product is not rounded on its own
    before the sum (PEFT rounds B(low) first): the same values within a rounding of out's dtype. Only without
    autograd (inference): the op has no backward, so a forward that records gradients keeps PEFT's add."""
    up = layer.lora_B[name]
    if in_place and out.is_contiguous() and up.bias is None and not torch.is_grad_enabled():
        lora_addmm_(out, scaled(low, layer.scaling[name]).to(out.dtype), up.weight, start)
        return out
    out[..., start : start + up.out_features].add_(scaled(up(low), layer.scaling[name]).to(out.dtype))
    return out
