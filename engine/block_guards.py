"""What a model with the engine's fused blocks (engine.attention.convert_blocks) would otherwise get wrong, silently
or deep inside a kernel, for calls that diffusers' own blocks take:

- text inputs of batch 1 beside latents of batch B (two prompts with one negative prompt under true CFG, prompt
  embeddings of one prompt with num_images_per_prompt=2, latents of batch 2 for one prompt): diffusers' blocks
  broadcast them in their first adaLN; the fused kernels take one batch. They are expanded to B before the blocks
  (the values diffusers' broadcast computes: every block of diffusers' runs at batch B from the first one on);
- diffusers' cache hooks added after optimize() (`transformer.enable_cache`): they hook modules the fused blocks do
  not call (the attention processors), so a TaylorSeer or PAB cache would silently do nothing, and the others fail
  inside diffusers. Refused, naming the engine's own step caches (the same images as diffusers' hooks);
- attention processors other than diffusers' FluxAttnProcessor, set before or after optimize(): the fused blocks
  never call them. Refused;
- `.to(dtype or device)` on the model: PyTorch gives every parameter a tensor of its own, so the fused projections'
  parts (views of the fused weight: engine.attention.fuse_linears) became copies: their memory counted twice, and a
  later `load_state_dict` reached the parts but not the fused weight the blocks read (an image from the old QKV
  weights and biases, without a word). The views are made again after each conversion (engine.lora.resync_fused_views);
- diffusers' `fuse_qkv_projections` (and its undo): the fused blocks' projections are fused already; diffusers'
  fusing would copy the weights into layers the blocks never call, and failed inside diffusers on quantised parts.
  Nothing is done;
- diffusers' keys: `load_state_dict` of a diffusers state dict (strict) does not count the fused layers' own keys
  missing (their parts, views of them, carry the values; made views again after `assign=True`); `state_dict()`
  lists diffusers' keys only (a plain diffusers model loads it); `save_pretrained` writes each part as a tensor of
  its own (safetensors refused the parts' shared memory), so that diffusers loads the folder. A quantised
  transformer is refused there, before anything is written: engine.quant.save_quantized writes it;
- diffusers' cache hooks on a transformer whose diffusers blocks are compiled or captured in CUDA graphs, which those
  cannot run (install_compiled_block_guards): refused at enable_cache and taken off again.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch
from torch import nn

from .errors import ConfigError
from .frames import BoundFrame
from .processor_guards import check_processor_types, check_processors_each_call, refuse_processor

logger = logging.getLogger(__name__)

_GUARDS = "_engine_block_guards"  # the transformer's hook handle and the methods shadowed on its instance
# _before_forward's, dropped with the guards
_PER_CALL_CACHES = ("_engine_part_bases", "_engine_part_pointers", "_engine_attention_modules")
# the text inputs a FLUX transformer (or ControlNet) broadcasts over the latents' batch (its timestep and guidance
# it does not: with a timestep of batch 1, diffusers' own blocks fail to concatenate the two streams)
BROADCAST_INPUTS = ("encoder_hidden_states", "pooled_projections")
# diffusers methods whose effect the fused blocks would not have, refused with the fix
REFUSED_METHODS = {
    "set_attention_backend": "the fused blocks run the engine's attention core (AttentionConfig(backend=...) picks it; "
    "diffusers' backends are for the 'baseline' and 'compile' presets)",
    "compile_repeated_blocks": "the blocks are the engine's, compiled by its own presets: use 'kernels-compile' (or "
    "EngineConfig(compile=CompileConfig(mode='regional')))",
}
STEP_CACHES = (
    "use the engine's own step caches, which give diffusers' images with its hooks: EngineConfig(step_cache="
    "StepCacheConfig(...)), `--cache taylorseer:5` / `--cache fbcache:0.08` on the command line"
)


def check_processors(model: nn.Module, name: str = "transformer") -> None:
    """Before the blocks are fused: diffusers hooks inside them (check_block_hooks), attention processors they would
    not call and a dtype the kernels do not take (engine.processor_guards)."""
    check_block_hooks(model, name, everywhere=True)
    check_processor_types(model, name)


def install_block_guards(model: nn.Module) -> None:
    """The guards above on `model` (a FluxTransformer2DModel or FluxControlNetModel whose blocks are the engine's);
    `remove_block_guards` takes them off. Idempotent."""
    if _GUARDS in model.__dict__:
        return
    for cached in _PER_CALL_CACHES:  # another optimize() before this one: its fused layers and parts are gone
        model.__dict__.pop(cached, None)
    handles = [
        model.register_forward_pre_hook(_broadcast_text_inputs, with_kwargs=True),
        model.register_load_state_dict_post_hook(_fused_keys_not_missing),
        model.register_state_dict_post_hook(_without_fused_keys),
        model.register_forward_pre_hook(_before_forward),
    ]
    shadowed = {}
    for method, fix in REFUSED_METHODS.items():
        if hasattr(model, method):
            shadowed[method] = model.__dict__.get(method)
            setattr(model, method, functools.partial(_refuse_method, type(model).__name__, method, fix))
    if hasattr(model, "enable_cache"):
        shadowed["enable_cache"] = model.__dict__.get("enable_cache")
        model.enable_cache = functools.partial(_refuse_cache, type(model).__name__)
    if hasattr(model, "set_attn_processor"):
        shadowed["set_attn_processor"] = model.__dict__.get("set_attn_processor")
        model.set_attn_processor = functools.partial(refuse_processor, model)
    for method in ("fuse_qkv_projections", "unfuse_qkv_projections"):
        if hasattr(model, method):
            shadowed[method] = model.__dict__.get(method)
            setattr(model, method, functools.partial(_already_fused, model, method))
    for method, wrapper in (("_apply", _apply_then_resync), ("save_pretrained", _save_as_diffusers)):
        if hasattr(model, method):
            shadowed[method] = model.__dict__.get(method)
            setattr(model, method, functools.partial(wrapper, model, getattr(model, method)))
    model.__dict__[_GUARDS] = (handles, shadowed)


def remove_block_guards(model: nn.Module) -> None:
    guards = model.__dict__.pop(_GUARDS, None)
    for cached in _PER_CALL_CACHES:
        model.__dict__.pop(cached, None)
    if guards is None:
        return
    handles, shadowed = guards
    for handle in handles:
        handle.remove()
    for method, previous in shadowed.items():
        if previous is None:
            model.__dict__.pop(method, None)
        else:
            setattr(model, method, previous)


def _apply_then_resync(model: nn.Module, apply, fn, *args, **kwargs):
    """Module._apply (what .to / .cuda / .half run), then the fused projections' parts made views again."""
    from .lora import resync_fused_views

    result = apply(fn, *args, **kwargs)
    resync_fused_views(model)
    return result


def _fused_keys_not_missing(model: nn.Module, incompatible_keys) -> None:
    """load_state_dict's post hook (see the module docstring)."""
    from .lora import fused_layers, resync_fused_views

    resync_fused_views(model)
    own = tuple(f"{prefix}.{fused}.{kind}" for prefix, _, fused, _, layer in fused_layers(model)
                if type(layer) is nn.Linear for kind in ("weight", "bias"))  # fmt: skip
    incompatible_keys.missing_keys[:] = [key for key in incompatible_keys.missing_keys if not key.endswith(own)]


def _without_fused_keys(model: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict()'s post hook: diffusers' keys only where the fused layer's parts view its weight (plain fused
    layers; a quantised one has no parts and keeps its keys), so that a plain diffusers model loads it (before:
    "Unexpected key(s)" for every fused QKV)."""
    from .lora import fused_layers

    for block, _, fused, _, layer in fused_layers(model):
        if type(layer) is nn.Linear:
            for kind in ("weight", "bias"):
                state_dict.pop(f"{prefix}{block}.{fused}.{kind}", None)


def _save_as_diffusers(model: nn.Module, save, *args, **kwargs):
    """save_pretrained with diffusers' keys (see the module docstring)."""
    from .lora import fused_layers

    quantised = [f"{block}.{name}" for block, _, name, _, layer in fused_layers(model) if type(layer) is not nn.Linear]
    if quantised:
        raise ConfigError(
            f"{type(model).__name__}.save_pretrained: its fused projections are quantised ({quantised[0]}, ...), which "
            "diffusers cannot load; write the pipeline with engine.quant.save_quantized(pipe, folder) (the engine "
            "loads it back), or save the transformer before optimize(). Nothing was written"
        )
    handle = model.register_state_dict_post_hook(_diffusers_keys)
    try:
        return save(*args, **kwargs)
    finally:
        handle.remove()


def _diffusers_keys(model: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """The fused layers' keys out, their parts' tensors (views of the fused weight) as copies in host memory."""
    from .lora import fused_layers

    for block, _, fused, names, _ in fused_layers(model):
        for kind in ("weight", "bias"):
            state_dict.pop(f"{prefix}{block}.{fused}.{kind}", None)
            for name in names:
                key = f"{prefix}{block}.{name}.{kind}"
                if key in state_dict:
                    state_dict[key] = state_dict[key].detach().to("cpu", copy=True)


def _already_fused(model: nn.Module, method: str) -> None:
    """diffusers' fuse_qkv_projections / unfuse_qkv_projections: the fused blocks compute QKV as one GEMM already
    (diffusers' fusing would add a copy of the weights they never read, and fails on quantised parts): nothing to do."""
    logger.info("%s.%s(): the engine's blocks run fused projections already; nothing done", type(model).__name__,
                method)  # fmt: skip


def _refuse_cache(model_name: str, config=None, *args, **kwargs):
    raise ConfigError(
        f"{model_name}.enable_cache({type(config).__name__}): diffusers' cache hooks sit on modules the engine's "
        f"fused blocks do not call, so the cache would do nothing or fail inside diffusers; {STEP_CACHES}. Or call "
        "enable_cache on a pipeline optimised with the 'baseline' preset, or with 'compile' for FirstBlockCache, "
        "MagCache and TaylorSeer lite (the others break its whole-block graphs)"
    )


@functools.cache
def _signature(forward) -> inspect.Signature:
    return inspect.signature(forward)


def _broadcast_text_inputs(module: nn.Module, args: tuple, kwargs: dict):
    """Expand BROADCAST_INPUTS of batch 1 to hidden_states' batch (contiguous: the kernels read rows). Keywords only
    (how diffusers' pipelines call the model) are read as they are; positional arguments are bound to the forward's
    names first."""
    bound = None
    if args:
        try:
            bound = _signature(type(module).forward).bind_partial(module, *args, **kwargs)
        except TypeError:  # a call diffusers' forward refuses too: let it say so
            return None
    arguments = kwargs if bound is None else bound.arguments
    hidden = arguments.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() == 0 or hidden.shape[0] == 1:
        return None
    batch = hidden.shape[0]
    expanded = {
        name: value.expand(batch, *value.shape[1:]).contiguous()
        for name in BROADCAST_INPUTS
        if isinstance(value := arguments.get(name), torch.Tensor) and value.dim() >= 1 and value.shape[0] == 1
    }
    if not expanded:
        return None
    if bound is None:
        return args, {**kwargs, **expanded}
    bound.arguments.update(expanded)
    return bound.args[1:], bound.kwargs


def _refuse_method(model_name: str, method: str, fix: str, *args, **kwargs):
    raise ConfigError(f"{model_name}.{method}() after optimize() would change nothing: {fix}")


def check_block_hooks(model: nn.Module, name: str = "transformer", everywhere: bool = False) -> None:
    """Refuse diffusers hooks the fused blocks would not run: a cache on the attention modules (PyramidAttention-
    Broadcast, TaylorSeer), or, at optimize() (`everywhere`), any hook inside a block (layerwise casting, whose fused
    projections would have none). Group offloading's hooks work with the fused blocks and pass."""
    for group in ("transformer_blocks", "single_transformer_blocks"):
        for index, block in enumerate(getattr(model, group, None) or []):
            modules = block.named_modules() if everywhere else (("", block), ("attn", getattr(block, "attn", None)))
            for where, module in modules:
                if hooks := _hook_names(module):
                    place = f"{group}.{index}" + (f".{where}" if where else "")
                    raise ConfigError(
                        f"{name}.{place} carries diffusers hooks {hooks}, which the engine's fused blocks would never "
                        "run (a different image, without a word). Remove the hook (pipe.transformer.disable_cache()) "
                        f"and {STEP_CACHES}; or use the 'baseline' or 'compile' preset"
                    )


def check_hooked_forward(model: nn.Module, name: str = "transformer") -> None:
    """Before compiling the blocks: a diffusers hook that replaced a block's forward (enable_cache with FirstBlockCache
    or MagCache) would be compiled over and dropped; refused, naming the fix. A leftover bound forward is fine."""
    for group in ("transformer_blocks", "single_transformer_blocks"):
        for index, block in enumerate(getattr(model, group, None) or []):
            forward = block.__dict__.get("forward")
            if isinstance(forward, BoundFrame):  # the engine's own compiled frame (a pipeline optimised before)
                continue
            if forward is not None and getattr(forward, "__func__", None) is not type(block).forward:
                hooks = sorted(getattr(getattr(block, "_diffusers_hook", None), "hooks", {})) or ["a hook"]
                raise ConfigError(
                    f"{name}.{group}.{index} has its forward replaced by {', '.join(hooks)} (diffusers' enable_cache "
                    "or offloading before optimize()): compiling the block would drop it. Remove it first; enable a "
                    "cache after optimize() (diffusers' FirstBlockCache and MagCache work on the 'compile' preset "
                    f"then), or {STEP_CACHES}"
                )


_COMPILED_GUARDS = "_engine_compiled_block_guards"  # on a compiled transformer with diffusers' own blocks


def install_compiled_block_guards(model: nn.Module, frames: bool | None, graphs: bool):
    """On a transformer whose diffusers blocks are compiled (the 'compile' preset; `frames`: through the engine's
    frames, False: nn.Module.compile, None: not compiled) or captured whole in CUDA graphs (`graphs`): refuse the
    diffusers hooks those cannot run, at `enable_cache` (undone before the error) and at each call (hooks applied
    directly). Returns the undo.
    Blocks compiled as one graph each (fullgraph) cannot trace a hook on their attention modules (PyramidAttention-
    Broadcast, TaylorSeer's full mode, FasterCache: dynamo failed with "Data-dependent branching"); without the frames,
    nn.Module.compile traces a hook that replaced a block's forward too (FirstBlockCache, MagCache, TaylorSeer lite);
    a CUDA graph of the whole forward would replay the branch its capture took."""
    if _COMPILED_GUARDS in model.__dict__:
        return lambda: None
    # the fused blocks' own guards refuse caches and hooks on the blocks; the hooks on their leaves are left
    check = functools.partial(check_leaves if _GUARDS in model.__dict__ else _check_compiled_hooks, frames=frames,
                              graphs=graphs)  # fmt: skip
    handle = model.register_forward_pre_hook(lambda module, args: check(module))
    wrapped = _COMPILED_WRAPPED[1:] if _GUARDS in model.__dict__ else _COMPILED_WRAPPED
    shadowed = {name: model.__dict__.get(name) for name in wrapped if hasattr(model, name)}
    if "enable_cache" in shadowed:
        model.enable_cache = functools.partial(_enable_cache_then_check, model, model.enable_cache, check)
    for name in ("enable_group_offload", "enable_layerwise_casting"):
        if name in shadowed:
            setattr(model, name, functools.partial(_refuse_inside_regions, model, getattr(model, name), frames, graphs))
    model.__dict__[_COMPILED_GUARDS] = True

    def undo():
        handle.remove()
        model.__dict__.pop(_COMPILED_GUARDS, None)
        for name, previous in shadowed.items():
            model.__dict__.pop(name, None)
            if previous is not None:
                setattr(model, name, previous)

    return undo


_COMPILED_WRAPPED = ("enable_cache", "enable_group_offload", "enable_layerwise_casting")


def _refuse_inside_regions(model: nn.Module, method, frames: bool | None, graphs: bool, *args, **kwargs):
    """diffusers' group offloading and layerwise casting hook modules; inside the compiled regions (the blocks and
    the embedders around them) dynamo fails on those hooks ("Skip inlining ... ModuleGroup.onload_", "Attempted to
    use torch.nn.Parameter() constructor"), and a CUDA graph of the forward would replay their copies as captured.
    Group offloading at block level runs around the blocks compiled through the engine's frames and is let through."""
    name = method.__name__
    if name == "enable_group_offload":
        level = kwargs.get("offload_type", args[2] if len(args) > 2 else "block_level")
        level = str(getattr(level, "value", level))  # diffusers' GroupOffloadingType or its string
        if not graphs and frames and level == "block_level":
            return method(*args, **kwargs)
        what = f"group offloading at {level}"
    else:  # its casts give each weight new memory every call, which a captured graph would not follow
        what = "layerwise casting"
    where = "is compiled" if frames is not None else "is replayed as a CUDA graph"
    raise ConfigError(
        f"{type(model).__name__}.{name}(): {what} hooks modules inside the transformer's regions, and the transformer "
        f"{where} (dynamo cannot trace those hooks; a graph would replay their copies as captured). Nothing was "
        "done. Use the engine's offload policies (EngineConfig(offload=OffloadConfig('block' or 'leaf'))) or fp8 "
        "weights (QuantConfig(transformer='fp8')), or diffusers' own on a pipeline optimised with 'baseline'"
        + (" (at block level it runs with the 'compile' preset)" if name == "enable_group_offload" else "")
    )


def _enable_cache_then_check(model: nn.Module, enable, check, *args, **kwargs):
    enable(*args, **kwargs)
    try:
        check(model)
    except ConfigError:
        model.disable_cache()  # nothing left half-done
        raise


def check_leaves(model: nn.Module, frames: bool | None, graphs: bool) -> None:
    """The fused blocks compiled or under CUDA graphs: leaf-level group offloading failed inside dynamo."""
    for group in ("transformer_blocks", "single_transformer_blocks"):
        _check_leaf_offload(model, getattr(model, group, None), frames, graphs)


def _check_compiled_hooks(model: nn.Module, frames: bool | None, graphs: bool) -> None:
    name = type(model).__name__
    for group in ("transformer_blocks", "single_transformer_blocks"):
        blocks = getattr(model, group, None)
        _check_leaf_offload(model, blocks, frames, graphs)
        # the modules themselves (the engine's step cache and streamer wrap them while they iterate)
        for index, block in enumerate(blocks._modules.values() if isinstance(blocks, nn.ModuleList) else []):
            attn = block._modules.get("attn")
            if _HOOKS not in block.__dict__ and (attn is None or _HOOKS not in attn.__dict__):
                continue  # no diffusers hook was ever put there (~1 us a block, where the full check costs ~3)
            place = f"{name}.{group}.{index}"
            attn_hooks = _hook_names(attn)
            if graphs and (hooks := _hook_names(block) + attn_hooks):
                raise ConfigError(
                    f"{place} carries diffusers hooks {hooks}, but the transformer's whole forward replays as a CUDA "
                    "graph (compile.cuda_graphs), which would repeat the branch its capture took at every step (a "
                    f"different image, without a word). Remove them (pipe.transformer.disable_cache()); {STEP_CACHES}"
                )
            if frames is not None and attn_hooks:
                raise ConfigError(
                    f"{place}.attn carries diffusers hooks {attn_hooks}; the 'compile' preset compiles each block as "
                    "one graph, which cannot run a hook inside it (dynamo fails on its data-dependent branch). Remove "
                    "it (pipe.transformer.disable_cache()); a cache on the blocks (FirstBlockCache, MagCache, "
                    f"TaylorSeer's lite mode) runs around the compiled blocks, or {STEP_CACHES}"
                )
            forward = block.__dict__.get("forward")
            hooked = forward is not None and not isinstance(forward, BoundFrame) and (
                getattr(forward, "__func__", None) is not type(block).forward)  # fmt: skip
            if hooked and frames is False:
                raise ConfigError(
                    f"{place} has its forward replaced by diffusers hooks {_hook_names(block) or ['a hook']}, which "
                    "nn.Module.compile would trace into the block's graph (dynamo fails on them): they run around "
                    "the compiled blocks through the engine's frames (backend 'inductor' with the compile cache and "
                    f"its frames on, CacheConfig(enabled=True, frames=True): the presets' default); or {STEP_CACHES}"
                )


_HOOKS = "_diffusers_hook"  # where diffusers' HookRegistry lives on a module (its hooks replace the forward)


def _check_leaf_offload(model: nn.Module, blocks, frames: bool | None, graphs: bool = False) -> None:
    """Hooks on the leaves inside the blocks, set past the wrapped enable_* methods; the first block's `attn.to_q`
    tells (one lookup): diffusers' leaf-level `apply_group_offloading` on compiled blocks (dynamo failed: "Skip
    inlining ... ModuleGroup.onload_"), `apply_layerwise_casting` under the forward's graphs (NaN images, H200)."""
    first = next(iter(blocks._modules.values()), None) if isinstance(blocks, nn.ModuleList) else None
    attn = getattr(first, "_modules", {}).get("attn")
    leaf = attn._modules.get("to_q") if attn is not None else None
    if (frames is None and not graphs) or leaf is None or _HOOKS not in leaf.__dict__:
        return
    if graphs and (hooks := _hook_names(leaf)):
        raise ConfigError(
            f"{type(model).__name__}: diffusers hooks {hooks} on the layers inside its blocks (e.g. apply_layerwise_"
            "casting called directly) under the forward's CUDA graphs (compile.cuda_graphs), whose replays would read "
            "what the capture's hooks did (NaN images). Load the pipeline again without them, or use "
            "compile.cuda_graphs=False"
        )
    registry = getattr(getattr(leaf, _HOOKS), "hooks", {})
    if frames is not None and any("group_offload" in type(hook).__module__ for hook in registry.values()):
        raise ConfigError(
            f"{type(model).__name__} has diffusers' leaf-level group offloading (apply_group_offloading) on modules "
            "inside its compiled blocks, which dynamo cannot trace (diffusers has no call that removes it: load the "
            "pipeline again). Use the engine's offload policies (EngineConfig(offload=OffloadConfig('block' or "
            "'leaf'))), diffusers' block-level group offloading, or diffusers' own on a pipeline optimised with "
            "'baseline'"
        )


def _hook_names(module) -> list[str]:
    """diffusers hooks on `module` but group offloading's (which the compiled and fused blocks run with) and the
    engine's own (its step caches, sequence parallelism)."""
    registry = getattr(getattr(module, "__dict__", {}).get(_HOOKS), "hooks", {})  # no nn.Module __getattr__ miss
    return [n for n, h in registry.items()
            if "group_offload" not in type(h).__module__ and not type(h).__module__.startswith("engine.")]  # fmt: skip


def _before_forward(model: nn.Module, args) -> None:
    """Each call: a projection given a new weight tensor since the last (`.weight.data = ...`, a new Parameter: what
    PEFT's safe merge and weight-editing scripts do) is carried into the fused layer the blocks read (before: the old
    QKV, without a word); a diffusers cache hook put on the attention modules after optimize() is refused, and so
    is a processor set on one of them (`attn.set_processor(...)`, `attn.processor = ...`: it ran nowhere)."""
    check_block_hooks(model, type(model).__name__)
    check_processors_each_call(model)
    pointers = _part_pointers(model)
    if pointers != model.__dict__.get("_engine_part_pointers"):
        from .lora import resync_fused_views

        resync_fused_views(model)
        model.__dict__["_engine_part_pointers"] = _part_pointers(model)


def _part_pointers(model: nn.Module) -> list[int]:
    """The data pointers of the fused projections' parts' weights and biases, read from a list of the parts' base
    Linears made once (PEFT's wrappers keep the base Linear they wrap, so loading or unloading an adapter leaves it
    valid): ~0.06 ms a call at FLUX.1's depth, where walking the blocks each call took ~2 ms of host time."""
    bases = model.__dict__.get("_engine_part_bases")
    if bases is None:
        from .lora import fused_layers, is_lora_layer

        bases = []
        for _, block, _, names, fused in fused_layers(model):
            if type(fused) is nn.Linear:
                parts = map(block.get_submodule, names)
                bases += [part.base_layer if is_lora_layer(part) else part for part in parts]
        model.__dict__["_engine_part_bases"] = bases
    pointers = []
    for base in bases:
        weight, bias = base._parameters["weight"], base._parameters.get("bias")
        pointers += (weight.data_ptr(), bias.data_ptr() if bias is not None else 0)
    return pointers


__all__ = ["check_block_hooks", "check_hooked_forward", "check_processors", "install_block_guards",
           "install_compiled_block_guards", "remove_block_guards"]  # fmt: skip
