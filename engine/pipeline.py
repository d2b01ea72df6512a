"""`optimize(pipe, config)` and `restore(pipe)`.

`optimize` applies an EngineConfig to a diffusers FLUX.1 pipeline in place, in the order attention ->
quantisation -> a ControlNet's share of both -> offload -> VAE -> compile -> step cache (each step sees the modules
the previous one left). FluxEngine and the
engines of the other FLUX.1 tasks (engine/engines.py) are the diffusers pipeline classes with the same calls and
outputs, a `from_pretrained` that takes local paths or synthetic variant names, and clear errors where diffusers
would fail deep inside.
"""

from __future__ import annotations

import functools

import torch
from diffusers import FluxPipeline

from .config import EngineConfig, resolve_config
from .errors import ConfigError
from .steps import AppliedSteps
from .tasks import check_flux_pipeline

ENGINE_CONFIG_ATTR = "_flux_engine_config"
# what optimize() leaves on a pipeline, one attribute per step
STATE_ATTRS = (
    "attention_ops",
    "quant_state",
    "offload_state",
    "vae_state",
    "parallel_state",
    "controlnet_state",
    "compile_state",
    "step_cache_state",
    "engine_steps",
)
# on the transformer: the config and states of the optimize() that rewrote it, for the other pipelines over it
SHARED_ATTR = "_flux_engine_shared"


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (what FLUX ships in); fp32 on CPUs, whose bf16 convolutions are slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def engine_config_of(pipe) -> EngineConfig | None:
    """The EngineConfig that `optimize` applied last to `pipe`'s transformer, through this pipeline or another over
    the same transformer (the modules' state, which every pipeline over them shares); None for an untouched one, or
    one that restore() gave back."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None or SHARED_ATTR not in transformer.__dict__:  # no step of its touched the transformer
        return getattr(pipe, ENGINE_CONFIG_ATTR, None)
    shared = _shared_state(pipe)
    return None if shared is None else shared["states"][ENGINE_CONFIG_ATTR]


def _shared_state(pipe) -> dict | None:
    """The transformer's record of the optimize() that rewrote it; None where there is none, or restore() gave it
    back (then the record is kept empty, so that a pipeline's own older claim is not taken for the truth)."""
    transformer = getattr(pipe, "transformer", None)
    record = None if transformer is None else transformer.__dict__.get(SHARED_ATTR)
    return record if record and record.get("states") else None


def optimize(pipe, config: EngineConfig | str | None = None):
    """Apply `config` (an EngineConfig or a preset name) to `pipe` in place and return it.

    A pipeline is optimised once: the steps rewrite modules (processors, weights, hooks), so
    applying a second config on top of the first would stack them. Build or load a fresh pipeline
    to try another config.
    """
    config = resolve_config(config)
    check_flux_pipeline(pipe)
    from .controlnet import apply_controlnet, check_controlnet

    check_controlnet(pipe, config)  # what a config cannot do to a ControlNet is refused before any step runs
    _check_quantised_layers(pipe, config)
    if config.parallel.enabled and not isinstance(pipe, FluxPipeline):
        raise ConfigError(
            f"a parallel config runs text-to-image (FluxPipeline, FluxEngine) for now; {type(pipe).__name__} prepares "
            "its latents differently. Run it on one GPU, or generate with FluxEngine"
        )
    _adopt_shared_state(pipe)
    previous = engine_config_of(pipe)
    # a config whose steps changed no module (the baseline, a compile-cache folder alone) leaves nothing to stack on
    rewritten = previous is not None and not previous.is_baseline and len(getattr(pipe, "engine_steps", None) or ()) > 0
    if rewritten and previous != config:
        raise ConfigError(
            f"this pipeline is already optimised with {previous.label!r}; "
            f"load a fresh pipeline to apply {config.label!r}"
        )
    if not rewritten:
        from .stepcache.hooks import check_no_diffusers_cache

        _refuse_adapters_loaded_before(pipe, config)
        _refuse_blocks_compiled_before(pipe, config)
        check_no_diffusers_cache(pipe.transformer, config.step_cache)
        if config.compile.mode != "none":  # a cache hook that replaced a block's forward would be compiled over
            from .block_guards import check_hooked_forward

            check_hooked_forward(pipe.transformer)
    if previous == config:
        for name in STATE_ATTRS:
            setattr(pipe, name, getattr(pipe, name, None))
        _share_controlnets(pipe, config)
        _share_lora_calls(pipe)
        _guard_ip_adapter(pipe)
        return pipe
    # The steps in order; each part of EngineConfig that is still 'off' leaves the pipeline as it is. Each step
    # that ran is listed in pipe.engine_steps with its undo (engine.restore undoes them all).
    from .attention import apply_attention, attention_undo_blocker, remove_attention
    from .compile import apply_compile, remove_compile
    from .offload import apply_offload, remove_offload
    from .parallel.apply import apply_parallel, remove_parallel
    from .quant.apply import apply_quantization
    from .stepcache.hooks import apply_step_cache
    from .vae import apply_vae, remove_vae_tiling
    from .vae_kernels import apply_vae_kernels

    if config.cache.enabled and config.cache.directory:  # the kernels' tuning tables beside the compile cache
        from flux_kernels.tuning import set_tuning_directory

        from .compile import cache_root

        set_tuning_directory(cache_root(config.cache) / "kernel-tuning")
    steps = AppliedSteps()
    pipe.attention_ops = apply_attention(pipe, config.attention, force=config.parallel.enabled)
    if pipe.attention_ops is not None:
        blocker = attention_undo_blocker(pipe.transformer)
        steps.add("attention", None if blocker else lambda: remove_attention(pipe.transformer), blocker)
        _guard_ip_adapter(pipe)
    if not config.is_baseline:  # cuDNN's run-time compiled attention kernels, here and not in a first call
        from .warmup import warm_attention

        warm_attention(pipe.transformer, pipe.attention_ops.core if pipe.attention_ops is not None else None)
    pipe.quant_state = apply_quantization(pipe, config.quant)
    if pipe.quant_state is not None:
        steps.add("quantization", None, "the original weights were replaced by their quantised codes")
    pipe.controlnet_state = apply_controlnet(pipe, config, pipe.attention_ops)  # the transformer's steps, on it
    if pipe.controlnet_state is not None:
        steps.add("controlnet", *pipe.controlnet_state.step(pipe))
    pipe.offload_state = apply_offload(pipe, config.offload, compiled=config.compile.mode != "none")
    if pipe.offload_state is not None:
        offload_state = pipe.offload_state
        if pipe.quant_state is None:
            steps.add("offload", lambda: remove_offload(pipe, offload_state))
        else:  # quantisation is not undone, so neither is its placement (only the whole chain would help)
            steps.add("offload", None, "it placed quantised weights, which cannot be undone")
    if pipe.quant_state is not None and pipe.transformer.device.type == "cuda":
        from .offload import compact_resident

        compact_resident(pipe, pipe.offload_state, pipe.transformer.device)  # part of quantization's step
    pipe.vae_state = apply_vae(pipe, config.vae)
    if pipe.vae_state is not None:
        steps.add("vae", lambda: remove_vae_tiling(pipe))
    undo_vae_kernels = apply_vae_kernels(pipe, config.vae)  # before the VAE's compile, which traces them
    if undo_vae_kernels is not None:
        steps.add("vae-kernels", undo_vae_kernels)
    # before compile: the CUDA graphs capture the split, the exchanges and the gather with the blocks
    pipe.parallel_state = apply_parallel(pipe, config.parallel, pipe.attention_ops)
    if pipe.parallel_state is not None:
        parallel_state = pipe.parallel_state
        steps.add("parallel", lambda: remove_parallel(pipe, parallel_state))
    pipe.compile_state = apply_compile(pipe, config)
    if config.vae.compile:
        from .vae_compile import compile_vae

        pipe.compile_state = compile_vae(pipe, config, pipe.compile_state)
    if pipe.compile_state is not None:
        compile_state = pipe.compile_state
        undo_guards = _guard_compiled_blocks(pipe.transformer, compile_state, config.compile.mode != "none")
        if config.compile.mode != "none" and config.compile.backend == "inductor" and pipe.attention_ops is None:
            from .ip_scales import IpAdapterScales  # diffusers' blocks compiled: IP-Adapter scales as tensors

            compile_state.handles.append(IpAdapterScales(pipe.transformer))
        steps.add("compile", lambda: (undo_guards(), remove_compile(compile_state)))
    if config.compile.mode != "none" or pipe.attention_ops is not None:  # compiled or fused blocks: diffusers' sorting
        from .joint_kwargs import install_joint_kwargs_sorting

        # the transformer only: diffusers' FluxControlNetModel passes joint_attention_kwargs to none of its blocks
        steps.add("joint-attention-kwargs", install_joint_kwargs_sorting([pipe.transformer]))
    # last on the transformer's forward: a skipped step skips everything under it (compiled blocks, the graph replay)
    pipe.step_cache_state = apply_step_cache(pipe, config.step_cache, graphs=config.compile.cuda_graphs)
    if pipe.step_cache_state is not None:
        steps.add("step_cache", pipe.step_cache_state.remove)
    from .lora_calls import install_lora_calls, needs_lora_calls

    if needs_lora_calls(pipe):  # diffusers' LoRA calls, made to fit what the steps above did (engine/lora_calls.py)
        steps.add("lora", install_lora_calls(pipe))
    pipe.engine_steps = steps
    setattr(pipe, ENGINE_CONFIG_ATTR, config)
    _mark_shared_state(pipe)
    _release_replaced_weights(pipe)
    if not config.is_baseline and not config.parallel.enabled:  # a parallel run's ranks encode on rank 0 only
        from .warmup import warm_text_encoders

        warm_text_encoders(pipe)
    return pipe


def _check_quantised_layers(pipe, config: EngineConfig) -> None:
    """Before any step: components quantised in another mode than the config's, and projections the fused blocks
    cannot fuse (diffusers' own quantisation included): refused while nothing has changed."""
    from .attention import rewires_blocks
    from .controlnet import controlnets_of
    from .quant.apply import check_quant_modes
    from .quant.layers import check_fusable

    check_quant_modes(pipe, config.quant)
    if rewires_blocks(config.attention, force=config.parallel.enabled):
        for name, model in {"transformer": pipe.transformer, **controlnets_of(pipe)}.items():
            check_fusable(model, name)


def _guard_compiled_blocks(transformer, state, compiled: bool):
    """diffusers hooks the compiled blocks or the forward's CUDA graph cannot run, refused (engine.block_guards)."""
    from .block_guards import install_compiled_block_guards

    graphs = getattr(state, "cuda_graphs", None) is not None
    if not (compiled or graphs):  # the VAE's compile alone
        return lambda: None
    frames = state.frames is not None if compiled else None
    return install_compiled_block_guards(transformer, frames=frames, graphs=graphs)


def _refuse_adapters_loaded_before(pipe, config: EngineConfig) -> None:
    """LoRA adapters loaded before optimize(): the steps rewrite the layers PEFT wrapped (fusing failed on the
    wrappers with a KeyError; fp8 quantised the adapters' own factors and every call then failed). Refused before any
    step runs; adapters loaded after optimize() take the engine's path (engine/lora_calls.py). Configs that leave the
    transformer's layers as they are (compile alone, the VAE's steps, step caches) take them as diffusers does."""
    from .attention import rewires_blocks

    fuses = rewires_blocks(config.attention, force=config.parallel.enabled)  # as optimize() calls apply_attention
    if not (fuses or config.quant.transformer != "none" or config.offload.policy != "none"):
        return
    from .controlnet import controlnets_of
    from .lora import is_lora_layer

    for owner, model in (("transformer", pipe.transformer), *controlnets_of(pipe).items()):
        adapters = sorted({name for module in model.modules() if is_lora_layer(module) for name in module.lora_A})
        if adapters:
            raise ConfigError(
                f"the {owner} has LoRA adapters loaded ({', '.join(adapters)}) before optimize({config.label!r}), "
                "whose steps rewrite the layers they wrap. Call optimize() first and load_lora_weights() after it "
                "(the engine applies adapters on its fused and quantised layers), or pipe.unload_lora_weights() "
                "first (an adapter merged with fuse_lora() before unloading stays in the weights). Nothing was changed"
                + _control_lora_route(pipe, model)
            )


def _control_lora_route(pipe, model) -> str:
    """The route for a Control LoRA (its x_embedder widened to the Control class's channels): the Control classes
    refuse a 64-channel transformer at optimize(), so "optimize first" alone sends the user in a circle."""
    from .lora import is_lora_layer
    from .tasks import TASKS, control_lora_route, task_of

    embedder = getattr(model, "x_embedder", None)
    # diffusers records what a Control LoRA widened (to undo it at unload_lora_weights(reset_to_overwritten_params))
    widened = is_lora_layer(embedder) and "x_embedder.weight" in (getattr(model, "_overwritten_params", None) or {})
    if not widened or TASKS[task_of(pipe)].channels != TASKS["control"].channels:
        return ""
    return f". {control_lora_route(type(pipe).__name__, f'x_embedder to {embedder.in_features} inputs')}"


# the steps that rewrite the transformer (a compile step may hold the VAE's regions only)
TRANSFORMER_STEPS = ("attention", "quantization", "controlnet", "offload", "parallel", "step_cache", "lora")


def _mark_shared_state(pipe) -> None:
    """Record the pipeline's state on its transformer when a step rewrote it; else leave no record (a VAE-only or
    empty config: the transformer stays diffusers', free for other pipelines)."""
    compiled = getattr(pipe.compile_state, "compiled_modules", None) or []
    if not (any(name in TRANSFORMER_STEPS for name in pipe.engine_steps.names())
            or any(not module.startswith("vae.") for module in compiled)):  # fmt: skip
        pipe.transformer.__dict__.pop(SHARED_ATTR, None)
        return
    states = {name: getattr(pipe, name, None) for name in (ENGINE_CONFIG_ATTR, *STATE_ATTRS)}
    pipe.transformer.__dict__[SHARED_ATTR] = {"states": states, "vae": pipe.vae}


def _adopt_shared_state(pipe) -> None:
    """A pipeline over a transformer that optimize() rewrote through another pipeline (diffusers' `from_pipe`, its
    components passed on, or a pipeline whose own state went stale) takes that state, as FluxEngine.from_pipe does:
    optimize() then shares it (the same config) or refuses to stack another one on the rewritten modules."""
    shared = _shared_state(pipe)
    if shared is None or getattr(pipe, "engine_steps", None) is shared["states"]["engine_steps"]:
        return
    if shared["states"]["vae_state"] is not None and pipe.vae is not shared["vae"]:
        raise ConfigError(
            f"{type(pipe).__name__} shares a transformer optimised with {shared['states'][ENGINE_CONFIG_ATTR].label!r} "
            "but not the VAE that config's steps went with; build it over the same components (e.g. "
            f"{type(pipe).__name__}.from_pipe(pipe)) or over a transformer of its own"
        )
    for name, value in shared["states"].items():
        setattr(pipe, name, value)


def _share_controlnets(pipe, config: EngineConfig) -> None:
    """A pipeline that shares an optimised transformer and brings ControlNets of its own (FluxControlNetPipeline
    .from_pipe(pipe, controlnet=...)): they get the config's share, as optimize() gives it, recorded in the shared
    steps (restoring either pipeline undoes the shared modules' steps)."""
    from .controlnet import apply_controlnet, controlnets_of

    done = pipe.controlnet_state.nets.values() if pipe.controlnet_state is not None else ()
    shared = {name: any(net is other for other in done) for name, net in controlnets_of(pipe).items()}
    if all(shared.values()):
        return
    if any(shared.values()):
        raise ConfigError(
            f"{type(pipe).__name__} mixes ControlNets that another pipeline's optimize() rewrote with new ones "
            f"({', '.join(name for name, old in shared.items() if not old)}); give it only new ControlNets, or only "
            "the other pipeline's"
        )
    state = apply_controlnet(pipe, config, pipe.attention_ops)
    if state is not None:
        pipe.controlnet_state = state
        pipe.engine_steps.add("controlnet", *state.step(pipe))
        _mark_shared_state(pipe)


def _share_lora_calls(pipe) -> None:
    """A pipeline over components another pipeline optimised (FluxEngine.from_pipe): its LoRA calls need the same
    care as the first one's (engine/lora_calls.py), on this instance too."""
    from .lora_calls import install_lora_calls, needs_lora_calls

    if needs_lora_calls(pipe) and "load_lora_weights" not in vars(pipe):
        install_lora_calls(pipe)


def _refuse_blocks_compiled_before(pipe, config: EngineConfig) -> None:
    """Blocks compiled before optimize() (diffusers' compile_repeated_blocks, nn.Module.compile), under a config that
    compiles or streams the engine's fused blocks: the first call failed inside dynamo ("Attempted to call function
    marked as skipped", "Skip inlining ... disable()d function"), and every call after it."""
    from .attention import rewires_blocks

    compiles = config.compile.mode != "none" or config.compile.cuda_graphs
    if not rewires_blocks(config.attention, force=config.parallel.enabled) or not (compiles or config.offload.streams):
        return
    if compiles:  # diffusers' leaf-level group offloading set before: dynamo failed on its hooks at every call
        from .block_guards import check_leaves

        check_leaves(pipe.transformer, frames=True, graphs=config.compile.cuda_graphs)
    for group in ("transformer_blocks", "single_transformer_blocks"):
        for index, block in enumerate(getattr(pipe.transformer, group)):
            if getattr(block, "_compiled_call_impl", None) is not None:
                does = "compiles" if config.compile.mode != "none" else "streams"
                raise ConfigError(
                    f"transformer.{group}.{index} was compiled before optimize() (diffusers' compile_repeated_blocks "
                    f"or nn.Module.compile), and {config.label!r} {does} the engine's fused blocks itself: the two "
                    "fail together inside dynamo. Nothing was changed. Load the pipeline again without that compile "
                    "(torch cannot undo it), or optimise with a preset that keeps it ('kernels', 'fp8', "
                    "'int8-weight'); 'compile' compiles diffusers' own blocks"
                )


def _runs_fused_blocks(transformer) -> bool:
    from .attention import EngineDoubleBlock, EngineSingleBlock

    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    return any(isinstance(block, (EngineDoubleBlock, EngineSingleBlock)) for block in blocks)


def _guard_ip_adapter(pipe) -> None:
    """On a pipeline over the engine's fused blocks (this optimize()'s, or another pipeline's over the same
    transformer): load_ip_adapter refused before diffusers changes anything (`_refuse_ip_adapter`)."""
    if hasattr(pipe, "load_ip_adapter") and _runs_fused_blocks(pipe.transformer):
        pipe.load_ip_adapter = functools.partial(_refuse_ip_adapter, pipe)


def _refuse_ip_adapter(pipe, *args, **kwargs):
    """diffusers' load_ip_adapter on a pipeline whose transformer runs the fused blocks, refused before diffusers
    changes anything (it set the transformer's encoder_hid_proj to None and loaded a CLIP image encoder into the
    pipeline before the processors were refused); diffusers' own once the blocks are diffusers' again (restore)."""
    if not _runs_fused_blocks(pipe.transformer):
        return type(pipe).load_ip_adapter(pipe, *args, **kwargs)
    raise ConfigError(
        "load_ip_adapter after optimize(): an IP-Adapter adds image attention to the attention processors, which the "
        "engine's fused blocks never call. Nothing was loaded. Load it on a pipeline optimised with the 'baseline' or "
        "'compile' preset (engine.restore(pipe), then optimize(pipe, 'compile'))"
    )


def restore(pipe: FluxPipeline) -> FluxPipeline:
    """Undo every step optimize() applied to `pipe`'s transformer (newest first, `pipe.engine_steps`; through this
    pipeline or another over the same transformer) and return it as plain diffusers. ConfigError, with nothing
    changed, when a step cannot be undone (quantisation)."""
    shared = _shared_state(pipe)
    # the transformer's steps, whichever pipeline over it applied them; else this pipeline's own (a VAE's steps)
    steps = shared["states"]["engine_steps"] if shared is not None else getattr(pipe, "engine_steps", None)
    if steps is not None:
        steps.undo_all()
    if shared is not None:
        pipe.transformer.__dict__[SHARED_ATTR] = {"states": None}  # given back: other pipelines' claims are stale
    for name in STATE_ATTRS:
        setattr(pipe, name, None)
    if hasattr(pipe, ENGINE_CONFIG_ATTR):
        delattr(pipe, ENGINE_CONFIG_ATTR)
    pipe.__dict__.pop("load_ip_adapter", None)
    return pipe


def _release_replaced_weights(pipe) -> None:
    """Steps that rebuild weights (fused projections, quantisation) leave the old storage in the CUDA
    allocator's cache; give it back so the optimised pipeline holds no more device memory than it uses."""
    device = pipe.transformer.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
