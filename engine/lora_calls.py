"""diffusers' LoRA calls (FluxLoraLoaderMixin on the pipeline, PeftAdapterMixin on the transformer) made to fit what
optimize() did to the transformer (the layers: engine/lora.py):
- each call checks first what cannot work (an nf4 merge on streamed blocks, a hot-swap above the target rank, a
  LoRA variant on fused projections, missing or foreign files) and leaves nothing half-loaded;
- after each call the fused views are made again (a safe merge replaced a part's weight), quantised merges settle,
  a disabled adapter still merged is unmerged (the fused blocks do not run PEFT's forward, which would);
- captured CUDA graphs bake the adapters' weights and scales in: every LoRA call drops them (captured again on the
  next call), except a hot-swap with tensor scales, which writes into the tensors the graphs read;
- under compile every adapter scale is a tensor, so a new scale recompiles nothing (engine/lora_scales.py);
- blocks that stream from host memory (offload block / leaf): the adapters' factors stay resident on the GPU beside
  the streamed blocks (a rank-64 adapter on every projection is ~0.5 GB, a twentieth of the weights); each LoRA call
  runs where the base weights live (the factors visit the host for it: a merge writes into the pinned host copy of
  the weights, which the blocks then stream) and puts the factors back on the GPU.
The care sits on the optimised pipeline's methods and on the transformer's own: a pipeline that shares the
transformer and was never optimised (diffusers' `from_pipe`, `Pipeline(**pipe.components)`) reaches the transformer's
methods, and gets the same care there.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cuda_graphs import drop_captured_graphs
from .errors import CheckpointError, ConfigError, InputError
from .lora import fused_layers, is_lora_layer, resync_fused_views
from .lora_scales import LORA_LAYERS, SCALING_TENSORS, layer_states, scales_are_tensors, scalings_as_tensors

# the pipeline methods of diffusers' FluxLoraLoaderMixin that change which adapters act, and how
LORA_METHODS = (
    "load_lora_weights", "set_adapters", "enable_lora", "disable_lora", "fuse_lora", "unfuse_lora",
    "unload_lora_weights", "delete_adapters", "enable_lora_hotswap",
)  # fmt: skip
# the transformer's methods (diffusers' PeftAdapterMixin) that those call, and that other pipelines call directly
TRANSFORMER_METHODS = (
    "load_lora_adapter", "set_adapters", "enable_lora", "disable_lora", "fuse_lora", "unfuse_lora", "unload_lora",
    "delete_adapters", "enable_lora_hotswap", "add_adapter", "set_adapter", "enable_adapters", "disable_adapters",
)  # fmt: skip
_ADDING = ("load_lora_adapter", "add_adapter")  # the transformer's methods that put new PEFT layers in
_HOTSWAP_RANK_ATTR = "_engine_lora_hotswap_rank"  # on the transformer: the target_rank of enable_lora_hotswap
_IN_CALL = "_engine_lora_call_open"  # on the transformer: a LoRA call the engine looks after is running
_GUARD = "_engine_lora_guard"  # on the transformer: the states its own methods' care reads
_WATCHED = "_engine_lora_watched"  # on the transformer: its PEFT layers and their merge counts after the last care


@dataclass
class TransformerSide:
    """What a LoRA call's care reads of an optimised pipeline (the same state objects every pipeline over the
    transformer shares), for calls that reach the transformer from a pipeline the engine never saw."""

    transformer: nn.Module
    compile_state: Any
    offload_state: Any
    step_cache_state: Any


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
            kept = module.__dict__.get(SCALING_TENSORS, {})
            for name, value in module.scaling.items():  # tensor scales (scalings_as_tensors) go with the factors
                if isinstance(value, torch.Tensor):
                    module.scaling[name] = kept[name] = value.to(device)


def install_lora_calls(pipe) -> Callable[[], None]:
    """Wrap the pipeline's LoRA methods and, once per transformer, the transformer's own (on the instances): refuse
    what cannot work before anything changes, and after each call resync the fused views and drop captured CUDA
    graphs. Returns the undo."""
    methods = [name for name in LORA_METHODS if hasattr(pipe, name)]  # a pipeline class may lack some
    shadowed = {name: pipe.__dict__[name] for name in methods if name in pipe.__dict__}
    for name in methods:
        setattr(pipe, name, functools.partial(_lora_call, pipe, name, getattr(pipe, name)))
    undo_transformer = _guard_transformer(pipe)

    def undo() -> None:
        for name in methods:
            if name in shadowed:
                setattr(pipe, name, shadowed[name])
            elif name in pipe.__dict__:
                delattr(pipe, name)
        if undo_transformer is not None:
            undo_transformer()

    return undo


def _guard_transformer(pipe) -> Callable[[], None] | None:
    """The transformer's LoRA methods wrapped with the same care (None: another pipeline over it did it already)."""
    transformer = pipe.transformer
    if _GUARD in transformer.__dict__:
        return None
    side = TransformerSide(transformer, *(getattr(pipe, name, None) for name in ("compile_state", "offload_state",
                                                                                 "step_cache_state")))  # fmt: skip
    transformer.__dict__[_GUARD] = side
    names = [name for name in TRANSFORMER_METHODS if hasattr(transformer, name)]
    for name in names:
        transformer.__dict__[name] = functools.partial(_transformer_call, side, name, getattr(transformer, name))
    undo_widths = None
    if _is_quantized(transformer):  # diffusers' width check before any pipeline's load reads weights it has not
        from .quant.lora import route_width_checks

        undo_widths = route_width_checks()
    _watch_merges(transformer)
    handles = [transformer.register_forward_pre_hook(functools.partial(_changed_past_the_methods, side),
                                                     with_kwargs=True),
               transformer.register_forward_hook(functools.partial(_after_scaled_call, side), with_kwargs=True,
                                                 always_call=True)]  # fmt: skip
    if _compiled(pipe):
        scalings_as_tensors(transformer)  # adapters loaded before optimize()
    from .grad_guard import backward_blockers, install_grad_guard

    # a LoRA trained through the engine's kernels, fp8 GEMMs or streamed blocks would learn from wrong gradients
    handles += [handle for handle in [install_grad_guard(transformer, backward_blockers(pipe))] if handle is not None]

    def undo() -> None:
        for name in (*names, _GUARD, _WATCHED, _HOTSWAP_RANK_ATTR, _IN_CALL):
            transformer.__dict__.pop(name, None)
        for handle in handles:
            handle.remove()
        if undo_widths is not None:
            undo_widths()

    return undo


def _lora_call(pipe, name: str, method: Callable, *args, **kwargs):
    with _care(pipe, name, args, kwargs):
        if name == "load_lora_weights":
            return _load(pipe, method, *args, **kwargs)
        return method(*args, **kwargs)


def _transformer_call(side: TransformerSide, name: str, method: Callable, *args, **kwargs):
    """A transformer LoRA method: within a pipeline's call (looked after there) as it is, else with the care."""
    if side.transformer.__dict__.get(_IN_CALL):
        return method(*args, **kwargs)
    with _care(side, name, args, kwargs):
        if name not in _ADDING:
            return method(*args, **kwargs)
        return _load_adapter(side, method, *args, **kwargs)


@contextlib.contextmanager
def _care(owner, name: str, args: tuple, kwargs: dict) -> Iterator[None]:
    """Around one LoRA call of `owner` (a pipeline, or the TransformerSide of a call that reached the transformer
    directly): what cannot work refused first; the fused views, merges, graphs, scales and streamed factors put
    right after, whatever the call did or raised."""
    transformer = owner.transformer
    hotswap = name in ("load_lora_weights", "load_lora_adapter") and bool(kwargs.get("hotswap"))
    streamed = streamed_device(owner)
    if streamed is not None and name in ("fuse_lora", "unfuse_lora") and _quant_mode(transformer) == "nf4":
        raise ConfigError(
            f"{name} on an nf4 transformer whose blocks stream from host memory (offload "
            f"'{owner.offload_state.policy}'): a merge re-quantises with bitsandbytes' CUDA kernels, and the streamed "
            "weights live in host memory. Keep the adapter unfused (it runs beside the streamed nf4 blocks), or use "
            "offload 'none' / 'model'. Nothing was changed"
        )
    if name == "fuse_lora" and (kinds := _kinds_merges_cannot_take(transformer)):
        raise ConfigError(
            f"fuse_lora on a transformer with layers quantised as {', '.join(kinds)} (not by the engine): a merge "
            "quantises the merged weights again, which the engine does in its own modes only (fp8, fp8-weight, "
            "int8-weight, nf4). Keep the adapter unfused (it runs beside the quantised layers), or load the "
            "transformer unquantised. Nothing was changed"
        )
    if name == "enable_lora_hotswap":
        transformer.__dict__[_HOTSWAP_RANK_ATTR] = kwargs.get("target_rank", args[0] if args else 128)
    if streamed is not None:  # the call runs where the streamed base weights live: host memory
        place_factors(transformer, torch.device("cpu"))
    outer = transformer.__dict__.get(_IN_CALL, False)
    transformer.__dict__[_IN_CALL] = True  # the transformer's own methods, called inside, pass straight through
    try:
        yield
    finally:
        transformer.__dict__[_IN_CALL] = outer
        _settle(owner, streamed, keep_graphs=hotswap and scales_are_tensors(transformer))


def _kinds_merges_cannot_take(transformer) -> list[str]:
    from .quant.layers import FUSABLE_KINDS, quantized_kind

    kinds = {quantized_kind(module) for module in transformer.modules()} - {None, *FUSABLE_KINDS}
    return sorted(kinds)


def _settle(owner, streamed: torch.device | None, keep_graphs: bool = False) -> None:
    """After a LoRA call (or merges made past the methods): the fused views, merges, graphs, streamed factors and
    scales as the engine's blocks need them."""
    transformer = owner.transformer
    # a disabled adapter still merged is unmerged, as PEFT's forward would do: the fused blocks and the fp8-input
    # path do not run that forward
    for module in transformer.modules():
        if is_lora_layer(module) and module.disable_adapters and module.merged:
            module.unmerge()
    resync_fused_views(transformer)
    if _is_quantized(transformer):
        from .quant.lora import settle_merges

        settle_merges(transformer)
    # a hot-swap copies the new factors and scales into the tensors the graphs read: they stay valid, as long as
    # every scale is a tensor (enable_lora_hotswap makes them so; a float one is baked into the graph)
    if not keep_graphs:
        drop_captured_graphs(owner)
    if streamed is not None:
        place_factors(transformer, streamed)
        owner.offload_state.reset()  # the ring prefetches across calls: a merge must not meet a stale device copy
    if _compiled(owner):
        scalings_as_tensors(transformer)
    _watch_merges(transformer)


def _watch_merges(transformer) -> None:
    """Note the transformer's PEFT layers and their states (merges, disabled, active adapters, scales), for
    _changed_past_the_methods."""
    layers = [module for module in transformer.modules() if is_lora_layer(module)]
    transformer.__dict__[_WATCHED] = (layers, layer_states(layers))


def _changed_past_the_methods(side: TransformerSide, transformer, args, kwargs) -> None:
    """A forward pre-hook: PEFT layers changed since the last LoRA call the engine saw (diffusers' pipeline-level
    unfuse_lora unmerges each PEFT layer itself, past the transformer's methods; so does code that calls a layer's
    unmerge, set_adapter, enable_adapters or set_scale): settle them before this forward (captured graphs would
    replay the old adapters). One tuple of the layers' states a forward (~0.1 ms for FLUX's ~340 adapted layers);
    nothing without adapters."""
    layers, states = transformer.__dict__.get(_WATCHED) or ((), ())
    if layers and layer_states(layers) != states:
        _settle(side, streamed_device(side))


def _after_scaled_call(side: TransformerSide, transformer, args, kwargs, output) -> None:
    """A forward hook, after a forward called with `joint_attention_kwargs={"scale": s}` (s != 1): diffusers scaled
    the adapters with PEFT's scale_layer (in place) and undid it with unscale_layer, which writes a new tensor, or for
    s = 0 resets every scale to lora_alpha / r with floats. The engine's scale tensors (compiled blocks) go back into
    the tensors the compiled blocks and graphs read; otherwise (uncompiled blocks: floats, or PEFT's own tensors
    after enable_lora_hotswap) scales left other than the graphs baked or read drop the graphs. Other forwards cost
    one dict lookup."""
    scale = (kwargs.get("joint_attention_kwargs") or {}).get("scale", 1.0)
    layers, states = transformer.__dict__.get(_WATCHED) or ((), ())
    if scale == 1.0 or not layers:
        return
    if transformer.__dict__.get(LORA_LAYERS) is not None:
        scalings_as_tensors(transformer)
    elif layer_states(layers) != states:
        drop_captured_graphs(side)
    _watch_merges(transformer)


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


def _hotswap_limit(transformer, adapter_name: str | None) -> int | None:
    """The rank a hot-swap into `adapter_name` may bring: enable_lora_hotswap's target, else the adapter's own."""
    target = transformer.__dict__.get(_HOTSWAP_RANK_ATTR)
    if target is not None:
        return target
    ranks = [m.r[adapter_name] for m in transformer.modules() if is_lora_layer(m) and adapter_name in m.r]
    return max(ranks) if ranks else None


def _check_hotswap_rank(transformer, source, adapter_name: str | None) -> None:
    rank, limit = lora_rank(source), _hotswap_limit(transformer, adapter_name)
    if rank is not None and limit is not None and rank > limit:
        raise InputError(
            f"the LoRA's rank {rank} is above the hot-swap target rank {limit} (diffusers would swap it in and "
            f"make a different image without a word); call pipe.enable_lora_hotswap(target_rank={rank}) or more "
            "before the first load_lora_weights, or load it without hotswap=True. Nothing was swapped"
        )


def _adapter_names(owner) -> set[str]:
    """The adapters loaded: on every component of a pipeline, or on a transformer."""
    if hasattr(owner, "get_list_adapters"):
        return {adapter for names in owner.get_list_adapters().values() for adapter in names}
    return set(getattr(owner, "peft_config", None) or ())


def check_local_lora(source) -> bool:
    """Whether `source` is a path (not a state dict); CheckpointError for one that does not exist (diffusers would try
    the hub with it: the engine never downloads)."""
    if isinstance(source, str | os.PathLike) and not Path(source).exists():
        raise CheckpointError(
            f"LoRA {str(source)!r} does not exist; the engine loads LoRA weights from local files and state dicts "
            "only (nothing is downloaded): pass the path of a .safetensors file, a folder with weight_name=..., or a "
            "state dict"
        )
    return isinstance(source, str | os.PathLike)


def _load(pipe, load: Callable, *args, **kwargs):
    """load_lora_weights, with what diffusers would answer obscurely (or by trying a hub download) answered first,
    and a failed load leaving no adapter behind."""
    source = args[0] if args else kwargs.get("pretrained_model_name_or_path_or_dict")
    is_path = check_local_lora(source)
    if kwargs.get("hotswap"):
        _check_hotswap_rank(pipe.transformer, source, kwargs.get("adapter_name"))
    before = _adapter_names(pipe)
    try:
        if not _is_quantized(pipe.transformer):
            result = load(*args, **kwargs)
        else:
            from .quant.lora import quantized_lora_dispatch

            with quantized_lora_dispatch():
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
    _refuse_variants_on_fused_parts(pipe.transformer, _adapter_names(pipe) - before, not before,
                                    pipe.unload_lora_weights, pipe.delete_adapters)
    return result


def _refuse_variants_on_fused_parts(
    transformer, added: set[str], none_before: bool, unload: Callable, delete: Callable
) -> None:
    """A LoRA variant (DoRA) just loaded onto a projection the engine fuses: refused at the load (the blocks would
    refuse it at every call: updates_by_part), the adapters this load added taken out again (PEFT's wrappers too
    when there were none before)."""
    variants = sorted({(name, type(part.lora_variant[name]).__name__)
                       for _, block, _, names, _ in fused_layers(transformer)
                       for part in (block.get_submodule(n) for n in names) if is_lora_layer(part)
                       for name in getattr(part, "lora_variant", {}) if name in added})  # fmt: skip
    if variants:
        if none_before:
            unload()
        else:
            delete(sorted(added))
        name, kind = variants[0]
        raise ConfigError(
            f"adapter {name!r} is a LoRA variant ({kind}, e.g. DoRA) on a projection the engine fuses; plain LoRA only "
            "there: use the 'baseline' or 'compile' preset for it. Nothing was loaded"
        )


def _load_adapter(side: TransformerSide, load: Callable, *args, **kwargs):
    """transformer.load_lora_adapter (a state dict diffusers already converted, or a file) from a pipeline the engine
    never saw, or PEFT's transformer.add_adapter(LoraConfig) (its factors set after, by load_state_dict or training
    code): on quantised layers, the engine's PEFT layers (PEFT refused the fused fp8 parts: "Target module
    FusedAway() is not supported"); a hot-swap above the target rank, or a LoRA variant on fused projections,
    refused; a failed load leaves no adapter behind."""
    transformer = side.transformer
    if kwargs.get("hotswap"):
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path_or_dict")
        _check_hotswap_rank(transformer, source, kwargs.get("adapter_name"))
    before = _adapter_names(transformer)
    try:
        if not _is_quantized(transformer):
            result = load(*args, **kwargs)
        else:
            from .quant.lora import quantized_lora_dispatch

            with quantized_lora_dispatch():
                result = load(*args, **kwargs)
    except Exception:
        added = _adapter_names(transformer) - before
        if added:
            transformer.delete_adapters(sorted(added))
        raise
    _refuse_variants_on_fused_parts(transformer, _adapter_names(transformer) - before, not before,
                                    transformer.unload_lora, transformer.delete_adapters)  # fmt: skip
    return result


def load_lora_file(pipe, path, adapter_name: str, **kwargs):
    """pipe.load_lora_weights(path, adapter_name=...) for the command lines, with the engine's answers to a missing,
    unreadable or foreign file on every preset (on `baseline` the pipeline's own call is diffusers')."""
    return _load(pipe, pipe.load_lora_weights, str(path), adapter_name=adapter_name, **kwargs)


def _quant_mode(transformer) -> str | None:
    from .quant.apply import quant_mode_of

    return quant_mode_of(transformer)


def _is_quantized(transformer) -> bool:
    return _quant_mode(transformer) is not None
