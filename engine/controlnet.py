"""The ControlNet of diffusers' FLUX.1 ControlNet pipelines (FluxControlNetPipeline, its Img2Img and Inpaint),
optimised as the transformer it feeds.

A FluxControlNetModel is the FLUX.1 transformer's own blocks (FluxTransformerBlock, FluxSingleTransformerBlock),
fewer of them (InstantX / Shakker-Labs: 5 and 10, a quarter of the transformer's compute), each followed by a
projection that makes the residual the transformer adds after its blocks. It runs once a step, before the
transformer, so it gets what the config gives the transformer (`apply_controlnet`):

- attention: its blocks become the engine's fused blocks on the transformer's BlockOps (one attention core,
  measured once);
- quantisation: its Linears in the transformer's mode (`quant.transformer`), keeping its input embedders and the
  residual projections (engine.quant.policy KEEP['controlnet']);
- compile: its blocks and time/text embedder as regions, as the transformer's (the same block classes and widths
  share the transformer's graphs);
- offload block / leaf: its blocks stream from host memory as the transformer's do (engine.offload.policies);
- CUDA graphs: the transformer's graph takes the ControlNet's residuals as inputs, copied in before each replay as the
  latents are (engine/cuda_graphs.py); the ControlNet itself runs before it, compiled, not captured.

A FluxMultiControlNetModel gets the same for each of its nets. What a config cannot do to a ControlNet is refused
before anything changes (`check_controlnet`): see there.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from .config import EngineConfig
from .errors import ConfigError


def controlnets_of(pipe) -> dict:
    """The FluxControlNetModels of `pipe` by name ('controlnet', or 'controlnet.nets.<i>' inside a
    FluxMultiControlNetModel); empty for a pipeline without a ControlNet."""
    from diffusers import FluxControlNetModel, FluxMultiControlNetModel

    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is None:
        return {}
    if isinstance(controlnet, FluxControlNetModel):
        return {"controlnet": controlnet}
    if isinstance(controlnet, FluxMultiControlNetModel) and all(
        isinstance(net, FluxControlNetModel) for net in controlnet.nets
    ):
        return {f"controlnet.nets.{index}": net for index, net in enumerate(controlnet.nets)}
    raise ConfigError(
        f"{type(pipe).__name__}.controlnet is a {type(controlnet).__name__}; optimize() takes FLUX.1 ControlNets: a "
        "FluxControlNetModel, or a FluxMultiControlNetModel of them (pass a list of FluxControlNetModels)"
    )


_OPTIMISED_FOR = "_engine_optimised_for"  # on a ControlNet apply_controlnet changed: a weakref to the transformer


def _touches_controlnet(config: EngineConfig) -> bool:
    return not config.attention.is_default or config.quant.transformer != "none" or config.compile.mode != "none"


def check_controlnet(pipe, config: EngineConfig) -> None:
    """Refuse, before any step runs, a config that cannot do to `pipe`'s ControlNet what it does to the transformer.

    - a ControlNet already quantised in another mode than the transformer's, or on another device or in another
      dtype than the transformer (the ControlNet's outputs are added into the transformer's hidden states);
    - a ControlNet another pipeline's optimize() rewrote beside another transformer (before: that pipeline's images
      changed without a word, or this optimize() failed half-way with the transformer's blocks already rewritten).
    """
    nets = controlnets_of(pipe)
    if not nets:
        return
    if not _touches_controlnet(config):
        return
    from .quant.apply import quant_mode_of

    transformer = pipe.transformer
    mode = config.quant.transformer
    for name, net in nets.items():
        owner = net.__dict__.get(_OPTIMISED_FOR)
        if owner is not None and owner() is not None and owner() is not transformer:
            raise ConfigError(
                f"pipe.{name} was optimised already, beside another pipeline's transformer; optimize() rewrites a "
                "ControlNet in place (fused blocks, quantised weights), so the other pipeline's images would change "
                "or this call fail half-way. Load a ControlNet of its own for this pipeline, or build it over the "
                "same transformer (FluxControlNetPipeline.from_pipe(optimised_pipe, controlnet=...))"
            )
        if (net.device, net.dtype) != (transformer.device, transformer.dtype):
            raise ConfigError(
                f"pipe.{name} is on {net.device} in {net.dtype}, the transformer on {transformer.device} in "
                f"{transformer.dtype}; load the ControlNet with torch_dtype={transformer.dtype} and move it to "
                f"{transformer.device} before optimize()"
            )
        previous = quant_mode_of(net)
        if previous is not None and mode not in ("none", previous):
            raise ConfigError(
                f"pipe.{name} is already quantised as {previous!r}, the config quantises the transformer as "
                f"{mode!r}; load the ControlNet unquantised, or use quant.transformer={previous!r}"
            )


@dataclass
class ControlNetState:
    """What apply_controlnet did to each ControlNet (by name, as controlnets_of)."""

    nets: dict
    fused: bool = False  # the blocks are the engine's fused blocks (engine/attention.py)
    quantized: dict = field(default_factory=dict)  # name -> engine.quant.ComponentQuant, the nets quantised here
    compile_state: object = None  # engine.compile.CompileState of the compiled regions, or None
    guard_undos: list = field(default_factory=list)  # engine.block_guards' compiled-block guards, taken off by remove

    def undo_blocker(self) -> str:
        """Why `remove` cannot give the ControlNets back as they were ('' when it can)."""
        from .attention import attention_undo_blocker

        if self.quantized:
            return "the ControlNet's weights were replaced by their quantised codes"
        if self.fused:
            for net in self.nets.values():
                blocker = attention_undo_blocker(net)
                if blocker:
                    return f"the ControlNet: {blocker}"
        return ""

    def remove(self) -> None:
        """Undo apply_controlnet (unquantised ControlNets only): compiled regions, then the fused blocks."""
        from .attention import remove_attention
        from .compile import remove_compile

        for undo in self.guard_undos:
            undo()
        if self.compile_state is not None:
            remove_compile(self.compile_state)
        if self.fused:
            for net in self.nets.values():
                remove_attention(net)
        for net in self.nets.values():
            net.__dict__.pop(_OPTIMISED_FOR, None)

    def step(self, pipe) -> tuple:
        """(undo, why_not) for AppliedSteps.add: the undo also takes the state off `pipe`."""
        blocker = self.undo_blocker()
        if blocker:
            return None, blocker

        def undo() -> None:
            self.remove()
            vars(pipe).pop("controlnet_state", None)

        return undo, ""


def apply_controlnet(pipe, config: EngineConfig, ops=None) -> ControlNetState | None:
    """Give `pipe`'s ControlNets what `config` gives its transformer (module docstring); `ops`: the transformer's
    BlockOps (optimize()'s `pipe.attention_ops`), None where its blocks were left as diffusers'. None when there is
    no ControlNet or nothing to do. Call check_controlnet first, before any step runs."""
    nets = controlnets_of(pipe)
    mode = config.quant.transformer
    if not nets or (ops is None and mode == "none" and config.compile.mode == "none"):
        return None
    from .attention import convert_blocks
    from .quant.apply import quant_mode_of, quantize_model, set_fp8_options

    state = ControlNetState(nets=nets, fused=ops is not None)
    for name, net in nets.items():
        if ops is not None or mode != "none":  # rewritten to fit this transformer (compiled alone: not)
            net.__dict__[_OPTIMISED_FOR] = weakref.ref(pipe.transformer)
        if ops is not None:
            convert_blocks(net, ops)  # before quantising, as the transformer: the fused projections are quantised
        if mode != "none":
            if quant_mode_of(net) is None:
                state.quantized[name] = quantize_model(net, mode, "controlnet", config.quant.nf4_double_quant)
            set_fp8_options(net, config.quant)
    if config.compile.mode != "none":
        from .block_guards import install_compiled_block_guards

        state.compile_state = _compile_controlnets(nets, config)
        frames = state.compile_state.frames is not None  # diffusers' hooks the compiled blocks cannot run, refused
        state.guard_undos = [install_compiled_block_guards(net, frames=frames, graphs=False) for net in nets.values()]
    return state


def _compile_controlnets(nets: dict, config: EngineConfig):
    """Each ControlNet's blocks and embedders as compiled regions, within the engine's compiler caches (the compile
    step saves the artefacts after the transformer's first call, which comes after the ControlNet's)."""
    from .compile import CompileState, cache_root, compile_regions, scope_caches_to_forward

    cached = config.cache.enabled and config.compile.backend == "inductor"
    state = CompileState(cache_dir=cache_root(config.cache) if cached else None, artifact_path=None)
    for name, net in nets.items():
        compiled = len(state.compiled_modules)
        compile_regions(net, config.compile, state)
        state.compiled_modules[compiled:] = [f"{name}.{module}" for module in state.compiled_modules[compiled:]]
        if state.cache_dir is not None:
            state.handles += scope_caches_to_forward(net, state.cache_dir)
    return state
