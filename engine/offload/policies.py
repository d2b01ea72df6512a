"""The offload policies (none, model, block, leaf): where each component lives, and apply_offload."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import OffloadConfig
from ..errors import ConfigError
from .prompt_cache import PromptCache, encoders_fingerprint
from .streamer import (
    HostBuffer,
    PackedUnit,
    Streamer,
    bracket,
    module_tensors,
    stream_module_lists,
    unstream_module_lists,
)

logger = logging.getLogger(__name__)

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


# ----------------------------------------------------------------------------- the policies


@dataclass
class OffloadState:
    """What apply_offload set up: for the bench (bytes moved, device bytes held) and for error recovery."""

    policy: str
    device: torch.device
    streamers: dict[str, Streamer] = field(default_factory=dict)
    on_demand: dict[str, ResidentOnDemand] = field(default_factory=dict)
    prompt_cache: PromptCache | None = None
    setup_s: float = 0.0
    own_encode_prompt: object = None  # an encode_prompt the pipeline instance had before the policy wrapped its own
    hooks: list = field(default_factory=list)  # the on-demand encoders' visits around their own calls

    def reset(self) -> None:
        """Put every streamed unit back in host memory (after an out-of-memory error, say)."""
        for streamer in self.streamers.values():
            streamer.reset()
        for holder in self.on_demand.values():
            holder.depth = 1  # however deep the call that failed had entered it
            holder.__exit__(None, None, None)

    def bytes_copied(self) -> int:
        return sum(s.stats.bytes_copied for s in self.streamers.values()) + sum(
            h.bytes_copied for h in self.on_demand.values()
        )

    def summary(self) -> dict:
        return {
            "policy": self.policy,
            "setup_s": round(self.setup_s, 2),
            "streamers": {
                name: {
                    "units": len(s.units),
                    "slots": s.slot_count,
                    "slot_MiB": round(s.slot_bytes / 2**20, 1),
                    "host_GiB": round(sum(u.nbytes for u in s.units) / 2**30, 3),
                    **s.stats.as_dict(),
                }
                for name, s in self.streamers.items()
            },
            "prompt_cache": None
            if self.prompt_cache is None
            else {"hits": self.prompt_cache.hits, "misses": self.prompt_cache.misses},
        }


def transformer_block_lists(transformer: nn.Module) -> list[nn.ModuleList]:
    return [transformer.transformer_blocks, transformer.single_transformer_blocks]


def _encoder_block_lists(name: str, encoder: nn.Module) -> list[nn.ModuleList]:
    if name == "text_encoder_2":  # T5EncoderModel
        return [encoder.encoder.block]
    return [encoder.text_model.encoder.layers]  # CLIPTextModel


def _blocks_streamer(model, lists, device, slots: int, name: str, pin: bool, transient: bool = False) -> Streamer:
    blocks = [block for module_list in lists for block in module_list]
    units = [PackedUnit(f"{name}[{i}]", module_tensors(block)) for i, block in enumerate(blocks)]
    streamer = Streamer(units, device, slots, name, HostBuffer.pack(units, pin), transient=transient)
    streamer.set_order(list(range(len(units))))
    streamer.lists = lists
    streamer.handles = stream_module_lists(model, lists, streamer)
    model.__dict__["_engine_streamed"] = True  # its tensors are views of host buffers, copied in place (quant.apply)
    return streamer


def _leaves(module: nn.Module) -> list[nn.Module]:
    """The Linear layers (bf16, fp8, nf4): the modules that always use their weights through their own forward.
    Other weights inside a block (the RMSNorm scales our fused kernels read directly) stay on the device."""
    return [m for m in module.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]


def storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def leaf_groups(lists) -> list[list[nn.Module]]:
    """The Linear layers of the blocks, grouped where they share storage (a fused QKV layer and the q/k/v views
    of its weight): a group is one unit, whichever of its layers runs brings all of it."""
    leaves = [leaf for blocks in lists for block in blocks for leaf in _leaves(block)]
    parent = list(range(len(leaves)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_leaf: dict[int, int] = {}
    for index, leaf in enumerate(leaves):
        for entry in module_tensors(leaf):
            key = storage_key(entry[3])
            if key in first_leaf:
                parent[root(index)] = root(first_leaf[key])
            else:
                first_leaf[key] = index
    groups: dict[int, list[nn.Module]] = {}
    for index, leaf in enumerate(leaves):
        groups.setdefault(root(index), []).append(leaf)
    return list(groups.values())


def _leaf_streamer(model: nn.Module, lists, device, slots: int, name: str, pin: bool) -> Streamer:
    """Every Linear group inside the blocks is a unit; hooks on each of its layers bracket their forward."""
    groups = leaf_groups(lists)
    units = []
    for index, group in enumerate(groups):
        entries, seen = [], set()
        for leaf in group:
            for entry in module_tensors(leaf):
                ident = (id(entry[0]), entry[1])
                if ident not in seen:
                    seen.add(ident)
                    entries.append(entry)
        units.append(PackedUnit(f"{name}.leaf[{index}]", entries))
    streamer = Streamer(units, device, slots, name, HostBuffer.pack(units, pin))
    streamer.lists, streamer.handles = [], bracket(model, streamer)
    model.__dict__["_engine_streamed"] = True
    for index, group in enumerate(groups):
        for leaf in group:
            streamer.handles.append(leaf.register_forward_pre_hook(lambda module, args, i=index: streamer.before(i)))
            streamer.handles.append(leaf.register_forward_hook(lambda module, args, output, i=index: streamer.after(i)))
    return streamer


def check_encoders_kept(pipe, placed: dict, policy: str) -> None:
    """A text encoder set on the pipeline after optimize() was never placed by the offload policy (the old one keeps
    moving, the new one runs wherever it is): refused, naming the fix."""
    for name, encoder in placed.items():
        current = getattr(pipe, name, None)  # None runs nothing (prompt embeddings given: diffusers' memory saver)
        if current is not None and current is not encoder:
            raise ConfigError(
                f"pipe.{name} was replaced after optimize() with offload policy {policy!r}, which placed the one "
                "before it: the new encoder would run unplaced. Set the encoder before optimize(), or "
                "restore(pipe), set it, and optimize(pipe, config) again"
            )


def _wrap_encode_prompt(pipe, state: OffloadState, encoders: dict) -> None:
    import inspect

    original = pipe.encode_prompt
    state.own_encode_prompt = vars(pipe).get("encode_prompt")  # what remove_offload puts back
    placed = {name: getattr(pipe, name, None) for name in TEXT_ENCODERS}
    signature = inspect.signature(original)

    def encode_prompt(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        check_encoders_kept(pipe, placed, state.policy)
        cache = state.prompt_cache
        if cache:
            cache.check_encoders(encoders_fingerprint(pipe))
        key = cache.key(bound.arguments, state.device, pipe.transformer.dtype) if cache else None
        cached = cache.get(key) if cache else None
        if cached is not None:
            return cached
        with encoders.get("text_encoder", NullContext()), encoders.get("text_encoder_2", NullContext()):
            result = original(*args, **kwargs)
        if cache:
            cache.check_encoders(encoders_fingerprint(pipe))  # as the call left them (replaced tensors adopted)
            cache.put(key, result)
        return result

    pipe.encode_prompt = encode_prompt


def remove_offload(pipe, state: OffloadState) -> None:
    """Undo apply_offload: every streamed or visiting unit gets a buffer of its own on the device, for good (the
    same values, laid out as in the host buffer), the block lists and hooks go back to diffusers' own, and
    encode_prompt is the pipeline's again (no prompt cache)."""
    state.reset()
    for streamer in state.streamers.values():
        for unit in streamer.units:
            unit.materialize(state.device)
        for handle in streamer.handles:
            handle.remove()
        unstream_module_lists(streamer.lists)
    for holder in state.on_demand.values():
        holder.packed.materialize(state.device)
    if state.own_encode_prompt is None:
        vars(pipe).pop("encode_prompt", None)
    else:
        pipe.encode_prompt = state.own_encode_prompt
    for handle in state.hooks:
        handle.remove()
    state.hooks.clear()
    state.streamers.clear()
    state.on_demand.clear()


class ResidentOnDemand:
    """A whole module (a text encoder) in pinned host memory, moved to the device for a call and back. Moving back is
    free: the host copy is kept, so only the device buffer is dropped."""

    def __init__(self, module: nn.Module, device: torch.device, name: str, pin: bool):
        self.module = module
        self.device = device
        self.packed = PackedUnit(name, module_tensors(module))
        self.host = HostBuffer.pack([self.packed], pin)
        self.buffer: torch.Tensor | None = None
        self.bytes_copied = 0
        self.depth = 0  # entered by the wrapped encode_prompt and by the module's own call (nested: one visit)

    def __enter__(self):
        if self.depth == 0:
            self.packed.adopt_replaced()  # tensors given new ones since packing: their values, not the packed ones
            self.buffer = torch.empty(self.packed.nbytes, dtype=torch.uint8, device=self.device)
            self.buffer.copy_(self.packed.host, non_blocking=True)
            self.packed.assign(self.packed.views(self.buffer))
            self.bytes_copied += self.packed.nbytes
        self.depth += 1  # only once the visit is on: an enter that raised (a dtype check, out of memory) leaves 0
        return self

    def __exit__(self, *exc):
        self.depth = max(self.depth - 1, 0)
        if self.depth == 0:
            self.packed.assign(self.packed.host_views)
            self.buffer = None


class NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _visit_on_call(encoder: nn.Module, holder: ResidentOnDemand) -> list:
    """The encoder visits the device around its own calls too, its inputs with it: a pipeline over the same
    components that the policy never wrapped (diffusers' `from_pipe`, FluxEngine.from_pipe) ran CLIP from host
    memory, on the CPU (H200, 2026-12-03: its images 49.7 dB from the optimised pipeline's). Inside the wrapped
    encode_prompt the visit is already on: nested, nothing more is copied."""

    def enter(module, args, kwargs):
        holder.__enter__()
        move = functools.partial(_to_device, device=holder.device)
        return tuple(map(move, args)), {key: move(value) for key, value in kwargs.items()}

    return [encoder.register_forward_pre_hook(enter, with_kwargs=True),
            encoder.register_forward_hook(lambda *_: holder.__exit__(None, None, None), always_call=True)]  # fmt: skip


def _to_device(value, device: torch.device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def apply_offload(pipe, config: OffloadConfig, device: torch.device | None = None, compiled: bool = False):
    """Place `pipe`'s components for `config` (see the module docstring); None for policy 'none'."""
    if config.policy == "none":
        return None
    device = torch.device(device) if device is not None else pipe.transformer.device
    if device.type == "cpu":
        logger.info("offload=%s on the CPU: the placement logic runs, nothing is saved", config.policy)
    if config.policy == "leaf" and compiled:
        raise ConfigError(
            "offload.policy='leaf' hooks every Linear, inside the compiled regions; use compile.mode='none' "
            "with 'leaf', or offload 'block' with compile"
        )
    started = time.perf_counter()
    pin = device.type == "cuda"
    state = OffloadState(config.policy, device)
    state.prompt_cache = PromptCache(config.prompt_cache) if config.prompt_cache else None
    encoders = {}
    for name in TEXT_ENCODERS:
        encoder = getattr(pipe, name, None)
        if encoder is None:
            continue
        if name == "text_encoder_2":  # T5: its blocks stream (the same bytes as moving it whole, 1/12 the peak)
            lists = _encoder_block_lists(name, encoder)
            state.streamers[name] = _blocks_streamer(
                encoder, lists, device, config.blocks_resident, name, pin, transient=True
            )
            move_unpacked(encoder, device, [state.streamers[name].host])
        else:
            encoders[name] = state.on_demand[name] = ResidentOnDemand(encoder, device, name, pin)
            state.hooks += _visit_on_call(encoder, encoders[name])
    _wrap_encode_prompt(pipe, state, encoders)
    if config.streams:
        transformer = pipe.transformer
        lists = transformer_block_lists(transformer)
        build = _blocks_streamer if config.policy == "block" else _leaf_streamer
        state.streamers["transformer"] = build(transformer, lists, device, config.blocks_resident, "transformer", pin)
        move_unpacked(transformer, device, [state.streamers["transformer"].host])
        from ..controlnet import controlnets_of

        for name, net in controlnets_of(pipe).items():  # a ControlNet's blocks are the transformer's classes: alike
            lists = transformer_block_lists(net)
            state.streamers[name] = build(net, lists, device, config.blocks_resident, name, pin)
            move_unpacked(net, device, [state.streamers[name].host])
    else:
        pipe.transformer.to(device)
    pipe.vae.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    state.setup_s = time.perf_counter() - started
    return state


def move_unpacked(model: nn.Module, device: torch.device, hosts: list[HostBuffer]) -> None:
    """Every tensor of `model` that no streamer packed (embedders, final norms, norm scales) to `device`."""
    ranges = [(h.tensor.data_ptr(), h.tensor.data_ptr() + h.tensor.numel()) for h in hosts]

    def packed(tensor: torch.Tensor) -> bool:
        return any(start <= tensor.data_ptr() < stop for start, stop in ranges)

    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and param.device != device and not packed(param):
                param.data = param.data.to(device)
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device and not packed(buffer):
                module._buffers[name] = buffer.to(device)
