"""LoRA adapters (diffusers' Flux LoRA API, PEFT's layers) on the engine's fused and quantised blocks: the layers.

The fused blocks compute QKV (and, in single-stream blocks, the MLP input) in one GEMM whose weight the original
projections view (or, quantised, whose rows FusedAway placeholders record). PEFT wraps those original modules
(`attn.to_q`, ...), which the fused GEMM does not call, so:
- the blocks add each active, unmerged adapter's low-rank update to its columns of the fused GEMM's output,
  exactly as PEFT's `lora.Linear.forward` adds it (`add_fused_lora`);
- a merge (`fuse_lora`) writes into the projection's weight, a view of the fused weight, so the GEMM sees it; a
  merge that replaced the tensor instead (diffusers' `safe_fusing=True`) is copied back into the fused weight and the
  view restored (`resync_fused_views`, after every LoRA call);
- quantised layers (fp8, int8 / fp8 weight-only, nf4) get PEFT layers of engine.quant.lora: the update beside the
  quantised base, merges quantised once from the original codes.
Here: the blocks' side (is_lora_layer .. fp8_lora_ready, called from engine.block_ops), the walk over the fused
layers (fused_layers, resync_fused_views) and the synthetic adapters of the bench and the tests (synthetic_lora).
What each LoRA call must do around diffusers' own (CUDA graphs, compiled blocks, streamed weights, quantised loads)
is in engine/lora_calls.py; the PEFT layers beside quantised bases, whose merges re-quantise from the original
codes, in engine/quant/lora.py.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError
from .lora_gemm import fp8_gemm_with_updates, fused_update_ready
from .lora_update import acting_adapters, add_update, down_projection, plain_adapters

# the Linear modules of FLUX blocks that LoRA trainers target: the ones the engine fuses and the others
LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp", "proj_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip


def fused_layers(model: nn.Module):
    """(state-dict prefix of the block, the block, fused layer's name, its parts' names, the fused module) of every
    block of `model` that has fused projections (engine.attention.convert_blocks)."""
    for group in ("transformer_blocks", "single_transformer_blocks"):
        for index, block in enumerate(getattr(model, group, None) or []):
            for fused_name, names in getattr(block, "fused_projections", {}).items():
                yield f"{group}.{index}", block, fused_name, names, getattr(block, fused_name)


# The functions from is_lora_layer to fp8_lora_ready run inside the compiled blocks: the frames shipped in
# engine/compiled/ hold dynamo's checksum of their lines, so moving or editing them stales those frames (caught by
# tests/test_frames.py; remade on a GPU by `bash benchmarks/gpu_plan.sh startup-frames-only cudnn-startup
# pack-artifacts`). They keep the lines they had before the calls' care moved to engine/lora_calls.py.


def is_lora_layer(module: nn.Module) -> bool:
    """A PEFT LoRA layer (it wraps the original module as `base_layer`)."""
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def active_lora(parts: list[nn.Module]) -> list[nn.Module | None] | None:
    """For projections fused into one GEMM (in column order): each one's PEFT layer if it has adapters acting, else
    None; None overall when none has (the blocks' fast path)."""
    layers = [part if is_lora_layer(part) and acting_adapters(part) else None for part in parts]
    return layers if any(layer is not None for layer in layers) else None


def add_fused_lora(
    out: torch.Tensor, parts: list[nn.Module], layers: list[nn.Module | None], x: torch.Tensor,
    x_scale: torch.Tensor | None = None, fp8=None,
) -> torch.Tensor:  # fmt: skip
    """`out` (the fused GEMM's output [..., sum of widths]) plus each acting adapter's update in its projection's
    columns: base + B(A(dropout(x))) * scaling, adapter by adapter (engine/lora_update.py: how). x_scale: x is the
    e4m3 input of the fp8 GEMM `fp8`, with these per-token scales."""
    updates, starts = [], []  # (layer, adapter), its first column
    offset = 0
    for part, part_updates in zip(parts, updates_by_part(layers), strict=True):
        updates += part_updates
        starts += [offset] * len(part_updates)
        offset += part.out_features
    lows = down_projection(updates, x, x_scale, fp8)
    for (layer, name), start, low in zip(updates, starts, lows, strict=True):
        add_update(out, start, layer, name, low, in_place=x_scale is not None)
    return out


def updates_by_part(layers: list[nn.Module | None]) -> list[list[tuple[nn.Module, str]]]:
    """Each fused part's acting (PEFT layer, adapter) pairs, in PEFT's order; a LoRA variant (DoRA) refused."""
    by_part = []
    for layer in layers:
        names = acting_adapters(layer) if layer is not None else []
        for name in names:
            if name in getattr(layer, "lora_variant", {}):
                raise ConfigError(
                    f"adapter {name!r} is a LoRA variant ({type(layer.lora_variant[name]).__name__}, e.g. DoRA) on a "
                    "projection the engine fuses; plain LoRA only there: use the 'baseline' or 'compile' preset for it"
                )
        by_part.append([(layer, name) for name in names])
    return by_part


def fp8_linear_with_lora(
    linear: nn.Module, parts: list[nn.Module], layers: list[nn.Module | None], x: torch.Tensor, x_scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """The fused fp8 GEMM `linear` on e4m3 x (per-token scales x_scale) with the acting adapters' updates in their
    parts' columns: one GEMM with the updates in its epilogue where engine.lora_gemm can, else add_fused_lora."""
    by_part, widths = updates_by_part(layers), [part.out_features for part in parts]
    if fused_update_ready(linear, x, widths, by_part, out_dtype):
        return fp8_gemm_with_updates(linear, x, x_scale, widths, by_part)
    return add_fused_lora(linear(x, x_scale, out_dtype=out_dtype), parts, layers, x, x_scale, linear)


def fp8_lora_ready(layers: list[nn.Module | None]) -> bool:
    """Whether the adapters acting on these fused parts can read the fp8 GEMM's e4m3 input (plain LoRA)."""
    return plain_adapters([(layer, name) for layer in layers if layer is not None for name in acting_adapters(layer)])


def resync_fused_views(transformer) -> None:
    """Make every fused projection's parts' weights and biases views of the fused ones again, carrying over any values
    a part's tensor was given as a new one (a safe merge, an unmerge that replaced it, `.to()`, `load_state_dict` with
    `assign=True`)."""
    for _, block, _, names, fused in fused_layers(transformer):
        if type(fused) is not nn.Linear:
            continue  # quantised: the parts hold no weights (merges write the fused rows: engine.quant.lora)
        offset = 0
        for name in names:
            part = block.get_submodule(name)
            base = part.base_layer if is_lora_layer(part) else part
            rows = base.out_features
            for kind in ("weight", "bias"):
                own, whole = getattr(base, kind), getattr(fused, kind)
                if own is None or whole is None:
                    continue
                fused_rows = whole.data[offset : offset + rows]
                if own.data_ptr() != fused_rows.data_ptr():
                    fused_rows.copy_(own.data)
                    setattr(base, kind, nn.Parameter(fused_rows, requires_grad=False))
            offset += rows


def synthetic_lora(
    transformer, rank: int, seed: int = 0, std: float | None = None, strength: float = 0.1
) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT-format LoRA state dict of `rank` on every attention and MLP projection of every block of
    `transformer` (random factors, deterministic by `seed`), in the transformer's dtype, on the CPU.

    The factors' std: `std` if given, else per projection such that B @ A's RMS is `strength` times its weight's (a
    trained adapter changes a layer by a fraction of it; equal stds s give B @ A an RMS of s^2 sqrt(rank))."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"LoRA rank {rank!r} must be an integer >= 1 (e.g. 16, 64)")
    from .quant.apply import is_quantized_layer
    from .quant.lora import dequantized_weight

    generator = torch.Generator().manual_seed(seed)
    # the first floating-point parameter's dtype (diffusers' model dtype), not a quantised layer's codes'
    dtype = next(p.dtype for p in transformer.parameters() if p.is_floating_point())
    state = {}
    for name, module in transformer.named_modules():
        if "blocks." in name and name.endswith(LORA_TARGETS) and hasattr(module, "in_features"):
            scale = std
            if scale is None:  # a quantised layer's codes are not its weight: the weight it computes with
                weight = dequantized_weight(module) if is_quantized_layer(module) else module.weight.detach().float()
                weight_rms = weight.pow(2).mean().sqrt().item()
                scale = (strength * weight_rms / rank**0.5) ** 0.5
            down = torch.randn(rank, module.in_features, generator=generator) * scale
            up = torch.randn(module.out_features, rank, generator=generator) * scale
            state[f"transformer.{name}.lora_A.weight"] = down.to(dtype)
            state[f"transformer.{name}.lora_B.weight"] = up.to(dtype)
    return state
