"""The step caches on a pipeline's transformer, on diffusers' hook machinery (HookRegistry, per-context state that
`transformer.cache_context("cond" / "uncond")` selects and the pipeline resets after each call), with the same
decisions and arithmetic as diffusers' FirstBlockCache and TaylorSeer (lite) hooks, and none of their graph breaks:

- TaylorSeer / static: one hook on the transformer's forward. A full step calls the forward (compiled regions, or
  the CUDA-graph replay) and updates the Taylor factors from its output; a skipped step returns the extrapolated
  output and runs nothing at all. The decision is the step index: no device sync.
- First-Block Cache: the double- and single-stream block lists iterate through `_CachedCall`s (as the offload
  streamer's lists do), outside the compiled blocks, so no compiled region changes. The first block's call computes
  the change of its residual on the device; the second block is launched before the host reads it (the step's one
  `.item()`), so the GPU is not left idle while the host waits and then launches the rest; a skipped step discards
  that block's output. The other blocks then run, or hand their inputs back untouched, and the last one's residual
  is kept for the next skipped step. Under CUDA graphs (compile.cuda_graphs), the blocks after the second replay
  as one graph on full steps (graphs.py).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import CacheContext, StateManager

from ..compile import fresh_tensor
from ..errors import ConfigError
from . import StepCacheConfig, taylorseer_computes

HOOK_NAME = "flux_engine_step_cache"
# FluxPipeline names its transformer calls ('cond', and 'uncond' under true CFG); the other FLUX.1 classes set no
# context, which diffusers' own cache hooks fail on: theirs are told apart by their latents (StepCacheHook.state)
DEFAULT_CONTEXT = "cond"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# the transformer forward's arguments a tail graph would bake in: tensors added between the blocks (one step's), and
# joint_attention_kwargs, whose LoRA "scale" diffusers multiplies into PEFT's float scales before the blocks run (as
# the whole-forward graphs, engine/cuda_graphs.py, a call with them runs its blocks as launched)
_BAKED_IN = ("controlnet_block_samples", "controlnet_single_block_samples", "joint_attention_kwargs")


class _StepState:
    """One context's state ('cond', 'uncond') for one pipeline call."""

    def __init__(self) -> None:
        self.step = -1  # the index of the transformer call in this pipeline call
        self.computed: list[bool] = []  # per call: whether it ran the transformer fully
        # TaylorSeer
        self.last_update_step: int | None = None
        self.factors: dict[int, torch.Tensor] = {}
        self.output_dtype: torch.dtype | None = None
        # First-Block Cache
        self.head_output: tuple[torch.Tensor, torch.Tensor] | None = None  # (image, text) after the first block
        self.head_residual: torch.Tensor | None = None
        self.tail_residuals: tuple[torch.Tensor, torch.Tensor] | None = None
        self.should_compute = True
        self.pending: torch.Tensor | None = None  # this step's change of the first block's residual, on the device
        self.candidate: tuple | None = None  # this step's first block output and residual, until decided

    def reset(self) -> None:
        self.__init__()


class StepCacheHook(ModelHook):
    """On the transformer: counts the steps per context, and for TaylorSeer / static decides and extrapolates."""

    _is_stateful = True

    def __init__(self, config: StepCacheConfig):
        super().__init__()
        self.config = config
        self.state_manager = StateManager(_StepState)
        self.last_call: dict[str, list[bool]] = {}  # context -> full (True) or skipped, per step, of the last call
        self._live: dict[str, _StepState] = {}  # this call's states, by context
        self.enabled = True  # False: every step full, as without the cache (StepCacheState.paused)
        self.in_forward = False
        self.tail_graphs = None  # fbcache under CUDA graphs: the blocks after the decider as a graph (graphs.py)
        self.plain_forward = True  # this forward's call has nothing a tail graph would bake in (_BAKED_IN)
        self._call_ids: torch.Tensor | None = None  # this pipeline call's img_ids (its transformer calls share them)
        self._latents: torch.Tensor | None = None  # the last call's hidden_states (the classes that name no context)
        self._own_context: CacheContext | None = None  # the context this hook set (the class sets none)
        self.head_control: torch.Tensor | None = None  # the ControlNet residual the forward adds after the first block

    def state(self, call: dict | None = None) -> _StepState:
        """The current context's state; `call`: a transformer call's arguments, which pick the context (the blocks
        of First-Block Cache ask without, and get the forward's). A call whose `img_ids` (made once by every pipeline
        call, passed to both of true CFG's calls) is not the last call's starts a new pipeline call: the states are
        reset (a call that failed mid-way never reset them, and the next one went on from its steps). FluxPipeline
        names its calls ('cond', and 'uncond' under true CFG); the other FLUX.1 classes name none, and under true CFG
        call twice a step with the same latents: the second call of a step is 'uncond' (before: one context for
        both, each step counted twice, TaylorSeer extrapolating between the prompts)."""
        context = self.state_manager._context
        named = context is not None and context is not self._own_context  # by the pipeline (cache_context)
        if call is not None:
            ids = call.get("img_ids")
            if self._call_ids is not None and ids is not self._call_ids:
                self.reset_state(None)
            if named:
                name = context.name
            else:  # the second call with one step's latents is true CFG's negative prompt
                name = "uncond" if self._latents is not None and call.get("hidden_states") is self._latents else (
                    DEFAULT_CONTEXT)  # fmt: skip
            self._call_ids, self._latents = ids, call.get("hidden_states")
            if not named and (context is None or context.name != name):
                context = self._own_context = CacheContext(name)
        elif context is None:
            context = self._own_context = CacheContext(DEFAULT_CONTEXT)
        self.state_manager.set_context(context)  # again where the reset above dropped it
        state = self.state_manager.get_state()
        self._live[context.name] = state
        return state

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        self.in_forward = True  # the block lists yield _CachedCalls (First-Block Cache) only inside the forward
        self.head_control = _head_control(module, kwargs)
        try:
            return self._forward(*args, **kwargs)
        finally:
            self.in_forward = False

    def _forward(self, *args, **kwargs):
        self.plain_forward = not any(kwargs.get(name) for name in _BAKED_IN)
        if not self.enabled:
            return self.fn_ref.original_forward(*args, **kwargs)
        state = self.state(kwargs)
        state.step += 1
        if self.config.mode == "fbcache":  # the blocks decide (_CachedCall), after the first one ran
            return self.fn_ref.original_forward(*args, **kwargs)
        full = self._computes(state.step)
        state.computed.append(full)
        if full:
            output = self.fn_ref.original_forward(*args, **kwargs)
            sample = output[0] if isinstance(output, tuple) else output.sample
            self._update(state, sample)
            return output
        sample = self._predict(state)
        if not kwargs.get("return_dict", True):
            return (sample,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample)

    def _computes(self, step: int) -> bool:
        if self.config.mode == "static":
            return step in self.config.steps
        return taylorseer_computes(self.config, step)

    def _update(self, state: _StepState, features: torch.Tensor) -> None:
        """diffusers' TaylorSeerState.update: divided differences up to the order, kept in factors_dtype."""
        new = {0: features}
        if state.last_update_step is not None:
            delta = state.step - state.last_update_step
            for order in range(self.config.order):
                previous = state.factors.get(order)
                if previous is None or previous.shape != new[order].shape:
                    break
                new[order + 1] = (new[order] - previous.to(features.dtype)) / delta
        kept = DTYPES[self.config.factors_dtype]
        state.factors = {order: factor.to(kept) for order, factor in new.items()}
        state.output_dtype = features.dtype
        state.last_update_step = state.step

    def _predict(self, state: _StepState) -> torch.Tensor:
        """diffusers' TaylorSeerState.predict: the Taylor series at the steps since the last full one."""
        offset = state.step - state.last_update_step
        output = torch.zeros_like(state.factors[0], dtype=state.output_dtype)
        for order in range(len(state.factors)):
            output = output + state.factors[order].to(state.output_dtype) * (offset**order / math.factorial(order))
        return output

    def propose_after_first_block(self, state: _StepState, image, text, residual: torch.Tensor) -> None:
        """diffusers' FBCHeadBlockHook._should_compute_remaining_blocks, less its graph break and its wait: the
        change is computed on the device and read (`decide`) only after the next block was launched, so the GPU
        runs that block while the host waits; a skipped step throws that block's output away."""
        state.candidate = (image, text, residual)
        if state.head_residual is None:  # the first step: nothing to compare with, a full step
            state.pending = None
            self._commit(state, True)
            return
        previous = state.head_residual
        state.pending = (residual - previous).abs().mean() / previous.abs().mean()

    def decide(self, state: _StepState) -> bool:
        """The step's one sync: whether the blocks after the first run (the change above the threshold)."""
        if state.pending is not None:
            change, state.pending = state.pending.item(), None
            self._commit(state, change > self.config.threshold)
        return state.should_compute

    def _commit(self, state: _StepState, full: bool) -> None:
        state.should_compute = full
        state.computed.append(full)
        if full:  # diffusers keeps the first block's output and residual of full steps only
            image, text, residual = state.candidate
            state.head_output, state.head_residual = (image, text), residual
        state.candidate = None

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        """After each pipeline call (diffusers' maybe_free_model_hooks), and before each engine call."""
        if any(state.computed for state in self._live.values()):
            self.last_call = {name: list(state.computed) for name, state in self._live.items()}
        self._live, self._call_ids, self._latents = {}, None, None
        self.state_manager.reset()
        return module


def _head_control(model: torch.nn.Module, kwargs: dict) -> torch.Tensor | None:
    """The ControlNet residual FluxTransformer2DModel.forward adds after its first block (index 0 of the double-stream
    samples, or of the single-stream ones where there are no double-stream blocks), or None."""
    double = len(getattr(model, "transformer_blocks", ())) > 0
    samples = kwargs.get("controlnet_block_samples" if double else "controlnet_single_block_samples")
    return samples[0] if samples is not None and len(samples) else None


class _CachedCall:
    """One block's call in a First-Block Cache step (see the module docstring)."""

    __slots__ = ("hook", "block", "role", "index")

    def __init__(self, hook: StepCacheHook, block: torch.nn.Module, role: str, index: int):
        # role: 'head' (the first block), 'decider' (the second: decides after its launch), 'middle', 'tail' (the last)
        # index: the position among the blocks after the decider (the tail graph's segment), -1 for head and decider
        self.hook, self.block, self.role, self.index = hook, block, role, index

    def __call__(self, *args, **kwargs):
        if not self.hook.enabled:  # paused: every block runs; the tail's output fresh as in a cached step's
            text, image = self._full(args, kwargs)
            return (fresh_tensor(text), fresh_tensor(image)) if self.role == "tail" else (text, image)
        state = self.hook.state()
        if self.role == "head":
            image_in = kwargs["hidden_states"]
            text, image = self.block(*args, **kwargs)
            self.hook.propose_after_first_block(state, image, text, image - image_in)
            return text, image
        if self.role == "decider" and state.pending is not None:
            head_image, head_text, _ = state.candidate  # the first block's output (before a ControlNet's residual)
            text, image = self.block(*args, **kwargs)  # launched before the wait: the GPU runs it meanwhile
            if not self.hook.decide(state):
                # diffusers' skipped step: the first block's output plus the blocks' residual of the last full step,
                # then the first ControlNet residual the forward added after it, in that order (the other order was
                # 1.7e-6 off in fp32); the blocks after hand it on untouched
                image = state.tail_residuals[0] + head_image
                control = self.hook.head_control
                return state.tail_residuals[1] + head_text, image if control is None else image + control
        elif not state.should_compute:
            return kwargs["encoder_hidden_states"], kwargs["hidden_states"]
        else:
            text, image = self._full(args, kwargs)
        if self.role == "tail":
            state.tail_residuals = (image - state.head_output[0], text - state.head_output[1])
            # what follows the blocks (norm_out, compiled) sees a fresh tensor whether the step was full or not
            text, image = fresh_tensor(text), fresh_tensor(image)
        return text, image

    def _full(self, args, kwargs):
        """The block on a full step: the blocks after the decider through the tail graph, where there is one."""
        graphs = self.hook.tail_graphs
        if graphs is None or self.index < 0 or args:
            return self.block(*args, **kwargs)
        if self.index == 0:
            return graphs.first(self.block, kwargs, graphs.usable(kwargs, self.hook.plain_forward))
        return graphs.next(self.block, kwargs, self.index)


class _CachedBlocks(torch.nn.ModuleList):
    """A block list whose iteration inside the transformer's forward, while a First-Block Cache is installed, yields
    the blocks as _CachedCalls; outside it (a user's `for block in transformer.transformer_blocks`), indexing, len,
    named_modules, state_dict and each block's compile see the blocks as they are."""

    def __iter__(self):
        roles = self.__dict__.get("_step_cache_roles")
        blocks = list(self._modules.values())
        hook = self.__dict__.get("_step_cache_hook")
        if roles is None or not hook.in_forward:
            return iter(blocks)
        return iter([_CachedCall(hook, block, *role) for block, role in zip(blocks, roles, strict=True)])


class StepCacheState:
    """What apply_step_cache installed on a transformer, and its undo."""

    def __init__(self, transformer: torch.nn.Module, hook: StepCacheHook, lists: list):
        self.transformer, self.hook, self.lists = transformer, hook, lists
        # diffusers' cache switches on the transformer, refused while the engine's cache runs (_refuse_cache_switch)
        self.shadowed = {name: transformer.__dict__.get(name) for name in _CACHE_SWITCHES if hasattr(transformer, name)}
        for name in self.shadowed:
            setattr(transformer, name, functools.partial(_refuse_cache_switch, transformer, hook.config, name))

    @property
    def config(self) -> StepCacheConfig:
        return self.hook.config

    @property
    def tail_graphs(self):
        """fbcache under CUDA graphs: the TailGraphs of the blocks after the decider (graphs.py); else None."""
        return self.hook.tail_graphs

    def last_call(self) -> dict[str, list[bool]]:
        """Per context ('cond', 'uncond'): full (True) or skipped, per step, of the last pipeline call."""
        return self.hook.last_call

    def reset(self) -> None:
        self.hook.reset_state(self.transformer)

    @contextlib.contextmanager
    def paused(self):
        """Every step full inside the block, as without the cache (engine.bench's uncached reference)."""
        self.hook.enabled = False
        try:
            yield
        finally:
            self.hook.enabled = True

    def remove(self) -> None:
        HookRegistry.check_if_exists_or_initialize(self.transformer).remove_hook(HOOK_NAME, recurse=False)
        for name, previous in self.shadowed.items():
            self.transformer.__dict__.pop(name, None)
            if previous is not None:
                setattr(self.transformer, name, previous)
        for blocks, original_class in self.lists:
            blocks.__class__ = original_class
            for name in ("_step_cache_roles", "_step_cache_hook"):
                blocks.__dict__.pop(name, None)


_CACHE_SWITCHES = ("enable_cache", "disable_cache")


def _refuse_cache_switch(transformer: torch.nn.Module, config: StepCacheConfig, name: str, *args, **kwargs):
    """diffusers' enable_cache / disable_cache on a transformer that runs the engine's step cache: enable_cache stacked
    diffusers' hook on the engine's (another image than diffusers' with its cache alone), disable_cache logged
    "nothing to disable" and the engine's cache ran on; both without a word."""
    what = f"{name}({type(args[0]).__name__})" if args else f"{name}()"
    if name == "enable_cache":
        effect = "would stack diffusers' cache on it (another image than diffusers' with that cache alone)"
    else:
        effect = "does not see it (diffusers' disable_cache finds no cache of its own)"
    raise ConfigError(
        f"{type(transformer).__name__}.{what} after optimize(): the transformer runs the engine's step cache "
        f"({config.label}), which {effect}. Nothing was changed. Use one cache: the engine's (it gives diffusers' "
        "cached images; `with pipe.step_cache_state.paused():` runs calls uncached), or engine.restore(pipe) (or a "
        "pipeline optimised without step_cache) and then diffusers' own"
    )


def check_no_diffusers_cache(transformer: torch.nn.Module, config: StepCacheConfig) -> None:
    """Before optimize()'s steps: a transformer with diffusers' own cache on would run both caches stacked (and its
    disable_cache is refused once the engine's cache is installed)."""
    own = getattr(transformer, "_cache_config", None)
    if config.enabled and own is not None:
        raise ConfigError(
            f"the transformer has diffusers' cache on ({type(own).__name__}) and the config adds the engine's step "
            f"cache ({config.label}): the two would run stacked (another image than either alone). Nothing was "
            "changed. Call pipe.transformer.disable_cache() first, or leave step_cache out of the config"
        )


def install_step_cache(transformer: torch.nn.Module, config: StepCacheConfig, graphs: bool = False) -> StepCacheState:
    """Install `config`'s step cache on a FluxTransformer2DModel (after the other steps: its hook is outermost);
    `graphs` (the config's compile.cuda_graphs): fbcache replays the blocks after the decider as a CUDA graph."""
    hook = StepCacheHook(config)
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(hook, HOOK_NAME)
    lists = []
    if config.mode == "fbcache":
        double, single = transformer.transformer_blocks, transformer.single_transformer_blocks
        count = len(double) + len(single)
        if count < 3:
            raise ConfigError(f"step_cache fbcache needs 3 or more transformer blocks; this transformer has {count}")
        names = ["head", "decider"] + ["middle"] * (count - 3) + ["tail"]
        roles = [(name, position - 2) for position, name in enumerate(names)]
        if graphs:
            from .graphs import TailGraphs

            hook.tail_graphs = TailGraphs(count - 2, transformer)
        for blocks, own in ((double, roles[: len(double)]), (single, roles[len(double) :])):
            lists.append((blocks, blocks.__class__))
            blocks.__class__ = _CachedBlocks
            blocks.__dict__["_step_cache_roles"] = own
            blocks.__dict__["_step_cache_hook"] = hook
    return StepCacheState(transformer, hook, lists)


def apply_step_cache(pipe, config: StepCacheConfig, graphs: bool = False) -> StepCacheState | None:
    """optimize()'s step: `config`'s step cache on `pipe.transformer`, or None when it is off."""
    return install_step_cache(pipe.transformer, config, graphs) if config.enabled else None
