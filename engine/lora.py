"""LoRA adapters (diffusers' Flux LoRA API, PEFT's layers) on the engine's fused and quantised blocks.

The fused blocks compute QKV (and, in single-stream blocks, the MLP input) in one GEMM whose weight the original
projections view (or, quantised, whose rows FusedAway placeholders record). PEFT wraps those original modules
(`attn.to_q`, ...), which the fused GEMM does not call, so:
- the blocks add each active, unmerged adapter's low-rank update to its columns of the fused GEMM's output,
  exactly as PEFT's `lora.Linear.forward` adds it (`add_fused_lora`);
- a merge (`fuse_lora`) writes into the projection's weight, a view of the fused weight, so the GEMM sees it; a
  merge that replaced the tensor instead (diffusers' `safe_fusing=True`) is copied back into the fused weight and the
  view restored (`resync_fused_views`, after every LoRA call);
- quantised layers (fp8, int8 / fp8 weight-only, nf4) get PEFT layers of engine.quant.lora: the update beside the
  quantised base, merges quantised once from the original codes;
- captured CUDA graphs bake the adapters' weights and scales in: every LoRA call drops them (captured again on the
  next call), except a hot-swap with tensor scales, which writes into the tensors the graphs read;
- blocks that stream from host memory (offload block / leaf): the adapters' factors stay resident on the GPU beside
  the streamed blocks (a rank-64 adapter on every projection is ~0.5 GB, a twentieth of the weights); each LoRA call
  runs where the base weights live (the factors visit the host for it: a merge writes into the pinned host copy of
  the weights, which the blocks then stream) and puts the factors back on the GPU.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .cuda_graphs import drop_captured_graphs
from .errors import CheckpointError, ConfigError, InputError
from .lora_gemm import fp8_gemm_with_updates, fused_update_ready
from .lora_update import acting_adapters, add_update, down_projection, plain_adapters

# the pipeline methods of diffusers' FluxLoraLoaderMixin that change which adapters act, and how
LORA_METHODS = (
    "load_lora_weights",
    "set_adapters",
    "enable_lora",
    "disable_lora",
    "fuse_lora",
    "unfuse_lora",
    "unload_lora_weights",
    "delete_adapters",
    "enable_lora_hotswap",
)
_HOTSWAP_RANK_ATTR = "_engine_lora_hotswap_rank"  # the target_rank of the pipeline's enable_lora_hotswap call


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


# ----------------------------------------------------------------------------- the pipeline's LoRA calls


def needs_lora_calls(pipe) -> bool:
    """Whether optimize() left something diffusers' LoRA calls alone would get wrong: fused projections, captured
    CUDA graphs, quantised or streamed weights."""
    compile_state = getattr(pipe, "compile_state", None)
    return (
        getattr(pipe, "attention_ops", None) is not None
        or getattr(compile_state, "cuda_graphs", None) is not None
        or getattr(getattr(pipe, "step_cache_state", None), "tail_graphs", None) is not None
        or _is_quantized(getattr(pipe, "transformer", None))
        or streamed_device(pipe) is not None
        or _compiled(pipe)
    )


def _compiled(pipe) -> bool:
    """Whether the transformer has compiled regions (a compiled VAE alone, engine.vae_compile, does not count)."""
    names = getattr(getattr(pipe, "compile_state", None), "compiled_modules", None) or []
    return any(not name.startswith("vae.") for name in names)


def streamed_device(pipe) -> torch.device | None:
    """Where a transformer whose blocks stream from host memory (offload block / leaf) computes; None otherwise."""
    offload = getattr(pipe, "offload_state", None)
    return offload.device if offload is not None and offload.policy in ("block", "leaf") else None


def place_factors(transformer, device: torch.device) -> None:
    """Every adapter's own tensors (PEFT's lora_A / lora_B, embeddings, DoRA magnitudes) onto `device`; the base
    layers they wrap stay where they are."""
    for module in transformer.modules():
        if is_lora_layer(module):
            for name in dict.fromkeys((*module.adapter_layer_names, "lora_magnitude_vector")):
                layer = getattr(module, name, None)
                if isinstance(layer, nn.Module):
                    layer.to(device)
            kept = module.__dict__.get(_SCALING_TENSORS, {})
            for name, value in module.scaling.items():  # tensor scales (scalings_as_tensors) go with the factors
                if isinstance(value, torch.Tensor):
                    module.scaling[name] = kept[name] = value.to(device)


def install_lora_calls(pipe) -> Callable[[], None]:
    """Wrap the pipeline's LoRA methods (on the instance): refuse what cannot work before anything changes, and after
    each call resync the fused views and drop captured CUDA graphs. Returns the undo."""
    methods = [name for name in LORA_METHODS if hasattr(pipe, name)]  # a pipeline class may lack some
    shadowed = {name: pipe.__dict__[name] for name in methods if name in pipe.__dict__}
    for name in methods:
        setattr(pipe, name, functools.partial(_lora_call, pipe, name, getattr(pipe, name)))
    handles = []
    if _compiled(pipe):
        scalings_as_tensors(pipe.transformer)  # adapters loaded before optimize()
        hook = pipe.transformer.register_forward_hook(_scalings_back_to_tensors, with_kwargs=True, always_call=True)
        handles.append(hook)

    def undo() -> None:
        for name in methods:
            if name in shadowed:
                setattr(pipe, name, shadowed[name])
            elif name in pipe.__dict__:
                delattr(pipe, name)
        for handle in handles:
            handle.remove()

    return undo


def _lora_call(pipe, name: str, method: Callable, *args, **kwargs):
    hotswap = name == "load_lora_weights" and bool(kwargs.get("hotswap"))
    streamed = streamed_device(pipe)
    if streamed is not None and name in ("fuse_lora", "unfuse_lora") and _quant_mode(pipe.transformer) == "nf4":
        raise ConfigError(
            f"{name} on an nf4 transformer whose blocks stream from host memory (offload "
            f"'{pipe.offload_state.policy}'): a merge re-quantises with bitsandbytes' CUDA kernels, and the streamed "
            "weights live in host memory. Keep the adapter unfused (it runs beside the streamed nf4 blocks), or use "
            "offload 'none' / 'model'. Nothing was changed"
        )
    if streamed is not None:  # the call runs where the streamed base weights live: host memory
        place_factors(pipe.transformer, torch.device("cpu"))
    try:
        if name == "enable_lora_hotswap":
            setattr(pipe, _HOTSWAP_RANK_ATTR, kwargs.get("target_rank", args[0] if args else 128))
        if name == "load_lora_weights":
            return _load(pipe, method, *args, **kwargs)
        return method(*args, **kwargs)
    finally:
        # a disabled adapter still merged is unmerged, as PEFT's forward would do: the fused blocks and the fp8-input
        # path do not run that forward
        for module in pipe.transformer.modules():
            if is_lora_layer(module) and module.disable_adapters and module.merged:
                module.unmerge()
        resync_fused_views(pipe.transformer)
        if _is_quantized(pipe.transformer):
            from .quant.lora import settle_merges

            settle_merges(pipe.transformer)
        # a hot-swap copies the new factors and scales into the tensors the graphs read: they stay valid, as long as
        # every scale is a tensor (enable_lora_hotswap makes them so; a float one is baked into the graph)
        if not (hotswap and _scales_are_tensors(pipe.transformer)):
            drop_captured_graphs(pipe)
        if streamed is not None:
            place_factors(pipe.transformer, streamed)
            pipe.offload_state.reset()  # the ring prefetches across calls: a merge must not meet a stale device copy
        if _compiled(pipe):
            scalings_as_tensors(pipe.transformer)


def _scales_are_tensors(transformer) -> bool:
    """Whether every adapter scale is a tensor in device memory, which captured CUDA graphs read at each replay (a
    host tensor's value is baked into the graph as a float is)."""
    layers = [m for m in transformer.modules() if is_lora_layer(m)]
    return all(
        isinstance(value, torch.Tensor) and value.device.type != "cpu"
        for layer in layers
        for value in layer.scaling.values()
    )


_SCALING_TENSORS = "_engine_scaling_tensors"  # a PEFT layer's scale tensors by adapter, kept across float writes
_LORA_LAYERS = "_engine_lora_layers"  # the transformer's PEFT layers when scalings_as_tensors last ran


def scalings_as_tensors(transformer) -> None:
    """Every adapter scale that is a Python float becomes a 0-dim float64 tensor beside the adapter's factors, the
    same tensor for an adapter each time.

    Under compile, dynamo treats the floats a region reads as constants (engine.compile.dynamo_settings): a float
    scale would recompile the blocks for each new value (`set_adapters` weights, `joint_attention_kwargs` scale).
    A tensor is an input of the graph instead, read from device memory (captured CUDA graphs read it at each replay,
    and a hot-swap writes into it, as into the float32 ones of PEFT's `enable_lora_hotswap`). float64 keeps PEFT's
    float arithmetic when diffusers scales and unscales it; the engine's updates multiply in fp32 as with a float
    (engine.lora_update.scaled). PEFT's own forward (compiled presets without the engine's fused blocks) rounds a
    tensor scale to the activations' dtype first, as it does under enable_lora_hotswap: at most 2^-9 of the update."""
    layers = transformer.__dict__[_LORA_LAYERS] = [m for m in transformer.modules() if is_lora_layer(m)]
    for layer in layers:
        kept = layer.__dict__.setdefault(_SCALING_TENSORS, {})
        for name, value in layer.scaling.items():
            if isinstance(value, torch.Tensor):
                kept[name] = value
                continue
            tensor = kept.get(name)
            if tensor is None:
                factors = layer.lora_A[name] if name in layer.lora_A else layer.get_base_layer()
                device = next(factors.parameters()).device
                tensor = kept[name] = torch.zeros((), dtype=torch.float64, device=device)
            tensor.fill_(value)
            layer.scaling[name] = tensor


def _scalings_back_to_tensors(transformer, args, kwargs, output) -> None:
    """After a forward called with `joint_attention_kwargs={"scale": 0}`: diffusers then resets the scales with PEFT's
    set_scale, which writes floats (any other scale is undone in place); they go back into their tensors before the
    next call would compile the blocks again for them. Other forwards cost one dict lookup."""
    if (kwargs.get("joint_attention_kwargs") or {}).get("scale", 1.0) == 0 and transformer.__dict__.get(_LORA_LAYERS):
        scalings_as_tensors(transformer)


def lora_rank(source) -> int | None:
    """The largest rank in a LoRA state dict or .safetensors file (its down / A factors' rows); None if unknown."""
    ends = ("lora_A.weight", "lora_down.weight")
    if isinstance(source, dict):
        ranks = [value.shape[0] for key, value in source.items() if key.endswith(ends)]
    elif isinstance(source, str | os.PathLike) and Path(source).is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(source), framework="pt") as handle:
                names = handle.keys()  # noqa: SIM118 (a safe_open handle is not a dict)
                ranks = [handle.get_slice(key).get_shape()[0] for key in names if key.endswith(ends)]
        except Exception as err:  # safetensors' own error type: a truncated or foreign file
            raise CheckpointError(
                f"LoRA file {str(source)!r} could not be read ({str(err).splitlines()[0] if str(err) else err!r}); is "
                "it a complete .safetensors file?"
            ) from err
    else:
        return None
    return max(ranks) if ranks else None


def _hotswap_limit(pipe, adapter_name: str | None) -> int | None:
    """The rank a hot-swap into `adapter_name` may bring: enable_lora_hotswap's target, else the adapter's own."""
    target = getattr(pipe, _HOTSWAP_RANK_ATTR, None)
    if target is not None:
        return target
    ranks = [m.r[adapter_name] for m in pipe.transformer.modules() if is_lora_layer(m) and adapter_name in m.r]
    return max(ranks) if ranks else None


def _adapter_names(pipe) -> set[str]:
    return {adapter for names in pipe.get_list_adapters().values() for adapter in names}


def _load(pipe, load: Callable, *args, **kwargs):
    """load_lora_weights, with what diffusers would answer obscurely (or by trying a hub download) answered first,
    and a failed load leaving no adapter behind."""
    source = args[0] if args else kwargs.get("pretrained_model_name_or_path_or_dict")
    is_path = isinstance(source, str | os.PathLike)
    if is_path and not Path(source).exists():
        raise CheckpointError(
            f"LoRA {str(source)!r} does not exist; the engine loads LoRA weights from local files and state dicts "
            "only (nothing is downloaded): pass the path of a .safetensors file, a folder with weight_name=..., or a "
            "state dict"
        )
    if kwargs.get("hotswap"):
        rank, limit = lora_rank(source), _hotswap_limit(pipe, kwargs.get("adapter_name"))
        if rank is not None and limit is not None and rank > limit:
            raise InputError(
                f"the LoRA's rank {rank} is above the hot-swap target rank {limit} (diffusers would swap it in and "
                f"make a different image without a word); call pipe.enable_lora_hotswap(target_rank={rank}) or more "
                "before the first load_lora_weights, or load it without hotswap=True. Nothing was swapped"
            )
    before = _adapter_names(pipe)
    try:
        if not _is_quantized(pipe.transformer):
            result = load(*args, **kwargs)
        else:
            from .quant.lora import quantized_lora_dispatch

            with quantized_lora_dispatch(pipe):
                result = load(*args, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        added = _adapter_names(pipe) - before
        if added:  # nothing half-loaded stays behind
            pipe.delete_adapters(sorted(added))
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if is_path and isinstance(err, OSError):
            raise CheckpointError(
                f"LoRA file {str(source)!r} could not be read ({first_line}); is it a complete .safetensors file? "
                "Nothing was loaded"
            ) from err
        if "Invalid LoRA checkpoint" in first_line:  # diffusers: no key of the state dict names a LoRA factor
            what = repr(str(source)) if is_path else "the state dict"
            raise InputError(
                f"{what} holds no LoRA factors diffusers can read "
                "(lora_A / lora_B, lora_down / lora_up, ...): is it a LoRA? Nothing was loaded"
            ) from err
        if "size mismatch" in str(err) or "shape" in first_line:
            width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
            raise InputError(
                f"the LoRA does not fit this transformer ({' '.join(str(err).split())[:300]}): it was made for another "
                f"model (this transformer is {width} wide; FLUX.1-dev and schnell are 3072). Load a LoRA for this "
                "model; nothing was loaded"
            ) from err
        raise
    _refuse_variants_on_fused_parts(pipe, _adapter_names(pipe) - before, none_before=not before)
    return result


def _refuse_variants_on_fused_parts(pipe, added: set[str], none_before: bool) -> None:
    """A LoRA variant (DoRA) just loaded onto a projection the engine fuses: refused at the load (the blocks would
    refuse it at every call: updates_by_part), the adapters this load added taken out again (PEFT's wrappers too
    when there were none before)."""
    variants = sorted({(name, type(part.lora_variant[name]).__name__)
                       for _, block, _, names, _ in fused_layers(pipe.transformer)
                       for part in (block.get_submodule(n) for n in names) if is_lora_layer(part)
                       for name in getattr(part, "lora_variant", {}) if name in added})  # fmt: skip
    if variants:
        if none_before:
            pipe.unload_lora_weights()
        else:
            pipe.delete_adapters(sorted(added))
        name, kind = variants[0]
        raise ConfigError(
            f"adapter {name!r} is a LoRA variant ({kind}, e.g. DoRA) on a projection the engine fuses; plain LoRA only "
            "there: use the 'baseline' or 'compile' preset for it. Nothing was loaded"
        )


def load_lora_file(pipe, path, adapter_name: str, **kwargs):
    """pipe.load_lora_weights(path, adapter_name=...) for the command lines, with the engine's answers to a missing,
    unreadable or foreign file on every preset (on `baseline` the pipeline's own call is diffusers')."""
    return _load(pipe, pipe.load_lora_weights, str(path), adapter_name=adapter_name, **kwargs)


def _quant_mode(transformer) -> str | None:
    from .quant.apply import quant_mode_of

    return quant_mode_of(transformer)


def _is_quantized(transformer) -> bool:
    return _quant_mode(transformer) is not None


def fused_layers(model: nn.Module):
    """(state-dict prefix of the block, the block, fused layer's name, its parts' names, the fused module) of every
    block of `model` that has fused projections (engine.attention.convert_blocks)."""
    for group in ("transformer_blocks", "single_transformer_blocks"):
        for index, block in enumerate(getattr(model, group, None) or []):
            for fused_name, names in getattr(block, "fused_projections", {}).items():
                yield f"{group}.{index}", block, fused_name, names, getattr(block, fused_name)


def resync_fused_views(transformer) -> None:
    """Make every fused projection's parts views of its weight again, carrying over any values a part's weight was
    given as a new tensor (a safe merge, an unmerge that replaced it)."""
    for _, block, _, names, fused in fused_layers(transformer):
        if type(fused) is not nn.Linear:
            continue  # quantised: the parts hold no weights (merges write the fused rows: engine.quant.lora)
        offset = 0
        for name in names:
            part = block.get_submodule(name)
            base = part.base_layer if is_lora_layer(part) else part
            rows = base.out_features
            weight_rows = fused.weight.data[offset : offset + rows]
            if base.weight.data_ptr() != weight_rows.data_ptr():
                weight_rows.copy_(base.weight.data)
                base.weight = nn.Parameter(weight_rows, requires_grad=False)
            offset += rows


# the Linear modules of FLUX blocks that LoRA trainers target: the ones the engine fuses and the others
LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp", "proj_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip


def synthetic_lora(
    transformer, rank: int, seed: int = 0, std: float | None = None, strength: float = 0.1
) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT-format LoRA state dict of `rank` on every attention and MLP projection of every block of
    `transformer` (random factors, deterministic by `seed`), in the transformer's dtype, on the CPU.

    The factors' std: `std` if given, else per projection such that B @ A's RMS is `strength` times its weight's (a
    trained adapter changes a layer by a fraction of it; equal stds s give B @ A an RMS of s^2 sqrt(rank))."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"LoRA rank {rank!r} must be an integer >= 1 (e.g. 16, 64)")
    generator = torch.Generator().manual_seed(seed)
    dtype = next(transformer.parameters()).dtype
    state = {}
    for name, module in transformer.named_modules():
        if "blocks." in name and name.endswith(LORA_TARGETS) and hasattr(module, "in_features"):
            scale = std
            if scale is None:
                weight_rms = module.weight.detach().float().pow(2).mean().sqrt().item()
                scale = (strength * weight_rms / rank**0.5) ** 0.5
            down = torch.randn(rank, module.in_features, generator=generator) * scale
            up = torch.randn(module.out_features, rank, generator=generator) * scale
            state[f"transformer.{name}.lora_A.weight"] = down.to(dtype)
            state[f"transformer.{name}.lora_B.weight"] = up.to(dtype)
    return state
