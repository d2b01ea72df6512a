"""Offload policies: where the weights live between uses, and how they reach the GPU in time.

`apply_offload(pipe, config, device)` places a pipeline's components for `EngineConfig.offload`:

- 'none': everything on `device`.
- 'model': the text encoders live in pinned host memory and visit the GPU only for `encode_prompt`
  (CLIP whole, in one DMA; T5 block by block through transient slots: the same bytes as moving it whole,
  a twelfth of the peak; nothing is copied back, the host copy is kept); prompt embeddings are cached
  per prompt. Transformer and VAE stay on the GPU.
- 'block': 'model', plus the transformer's 57 blocks (and T5's 24) live in pinned host memory, each
  block packed into one contiguous buffer so that bringing it in is one DMA. A ring of
  `blocks_resident` GPU slots holds the blocks in use; while block i computes on the default stream,
  block i+1 is copied into the next slot on a side stream (events order the two), so copies hide
  behind compute whenever a block's compute takes longer than its copy.
- 'leaf': the same with one Linear at a time (other weights in the blocks, a few norm scales, stay on the
  GPU): the lowest VRAM. The
  order the leaves run in is learnt on the first forward, which loads each on demand; later forwards
  prefetch along it. Leaf hooks sit inside the blocks, so 'leaf' does not combine with compile.

The blocks' parameters are never re-created: `param.data` points at a view of the host buffer
between uses and at a view of a GPU slot while the block runs, so module names, state dicts, the
compiled regions (parameters are graph inputs) and quantised layers (fp8 buffers, bitsandbytes
Params4bit with their quant_state) all keep working. Block iteration is intercepted by swapping the
class of the blocks' ModuleList (`__iter__` yields a thin caller while the model runs), so the
hooks stay outside the compiled regions and `fullgraph=True` holds.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import OffloadConfig
from .errors import ConfigError

logger = logging.getLogger(__name__)

ALIGN_BYTES = 256  # every packed storage starts on a 256-byte boundary (what the CUDA allocator gives)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def _align(nbytes: int) -> int:
    return (nbytes + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


# ----------------------------------------------------------------------------- packing a unit's tensors


@dataclass
class _Slot:
    """Where one tensor of a unit lives: its owner and attribute, and its layout inside the packed buffer."""

    owner: object
    name: str
    kind: str  # "param", "buffer" or "attr" (bitsandbytes QuantState tensors)
    offset: int
    storage_bytes: int
    dtype: torch.dtype
    shape: tuple
    stride: tuple
    storage_offset: int


def _quant_state_tensors(state, seen: set) -> list[tuple[object, str, str, torch.Tensor]]:
    """The tensors of a bitsandbytes QuantState (absmax, code, offset, and its nested state2)."""
    if id(state) in seen:
        return []
    seen.add(id(state))
    found = []
    for name, value in vars(state).items():
        if isinstance(value, torch.Tensor):
            found.append((state, name, "attr", value))
        elif type(value).__name__ == "QuantState":
            found.extend(_quant_state_tensors(value, seen))
    return found


def module_tensors(module: nn.Module) -> list[tuple[object, str, str, torch.Tensor]]:
    """Every tensor `module` computes with, as (owner, attribute, kind, tensor)."""
    found, seen_states = [], set()
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is None:
                continue
            found.append((sub, name, "param", param))
            state = getattr(param, "quant_state", None)
            if state is not None:
                found.extend(_quant_state_tensors(state, seen_states))
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                found.append((sub, name, "buffer", buffer))
    for _, name, _, tensor in found:
        data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
        if hasattr(type(data), "__tensor_flatten__"):  # a tensor subclass: its bytes are not one storage
            raise ConfigError(
                f"offload cannot stream {name!r} of {type(module).__name__}: it is a {type(data).__name__} "
                "(optimum-quanto's fp8-weight/int8-weight); stream 'fp8' or 'nf4' weights, or use offload 'model'"
            )
    return found


class PackedUnit:
    """One unit's tensors (a block, a leaf, a whole encoder) laid out in one flat buffer.

    Tensors that share a storage (the fused QKV weight and its q/k/v views) share it in the buffer too.
    `pack(host)` moves the unit's tensors into `host` (a slice of a pinned buffer) and frees their device memory.
    """

    def __init__(self, name: str, tensors: list[tuple[object, str, str, torch.Tensor]]):
        self.name = name
        offsets: dict[tuple, int] = {}
        self._storages: list[tuple[int, torch.UntypedStorage]] = []
        self.slots: list[_Slot] = []
        size = 0
        for owner, attr, kind, tensor in tensors:
            storage = tensor.untyped_storage()
            key = (storage.device, storage.data_ptr())
            if key not in offsets:
                offsets[key] = size
                self._storages.append((size, storage))
                size = _align(size + storage.nbytes())
            self.slots.append(
                _Slot(
                    owner, attr, kind, offsets[key], storage.nbytes(), tensor.dtype, tuple(tensor.shape),
                    tuple(tensor.stride()), tensor.storage_offset(),
                )
            )  # fmt: skip
        self.nbytes = size
        self.host: torch.Tensor | None = None
        self.host_views: list[torch.Tensor] = []

    def pack(self, host: torch.Tensor) -> None:
        for offset, storage in self._storages:
            source = torch.empty(0, dtype=torch.uint8, device=storage.device)
            source.set_(storage, 0, (storage.nbytes(),), (1,))
            host[offset : offset + storage.nbytes()].copy_(source)
        self._storages = []  # drop the references, so the device copies are freed once the views move
        self.host = host
        self.host_views = self.views(host)
        self.assign(self.host_views)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor of the unit as a view of `flat`, a uint8 buffer laid out like the host buffer."""
        views = []
        for slot in self.slots:
            base = flat[slot.offset : slot.offset + slot.storage_bytes].view(slot.dtype)
            # as_strided's offset counts from the start of the whole buffer's storage, not from `base`
            views.append(torch.as_strided(base, slot.shape, slot.stride, base.storage_offset() + slot.storage_offset))
        return views

    def assign(self, views: list[torch.Tensor]) -> None:
        for slot, view in zip(self.slots, views, strict=True):
            if slot.kind == "param":
                slot.owner._parameters[slot.name].data = view
            elif slot.kind == "buffer":
                slot.owner._buffers[slot.name] = view
            else:
                setattr(slot.owner, slot.name, view)


class HostBuffer:
    """One page-locked host buffer for many units, pinned at its exact size.

    torch's pinned allocator rounds every request up to a power of two (22 GiB of blocks would pin 32);
    registering a plain allocation with cudaHostRegister pins exactly what is used."""

    def __init__(self, nbytes: int, pin: bool):
        self.tensor = torch.empty(nbytes, dtype=torch.uint8)
        self.pinned = False
        if pin and nbytes:
            code = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 0)
            if int(code) != 0:
                raise RuntimeError(f"cudaHostRegister of {nbytes / 2**30:.2f} GiB failed with CUDA error {int(code)}")
            self.pinned = True
            weakref.finalize(self, _unregister, self.tensor.data_ptr())

    @classmethod
    def pack(cls, units: list[PackedUnit], pin: bool) -> HostBuffer:
        """Lay `units` out back to back in one buffer and move each into its slice."""
        host = cls(sum(unit.nbytes for unit in units), pin)
        offset = 0
        for unit in units:
            unit.pack(host.tensor[offset : offset + unit.nbytes])
            offset += unit.nbytes
        return host


def _unregister(pointer: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(pointer)


# ----------------------------------------------------------------------------- streaming units through a ring


@dataclass
class StreamStats:
    """What the streamer moved: for the bench's copy-time accounting."""

    bytes_copied: int = 0
    copies: int = 0
    waits: int = 0  # units that were not prefetched and had to be requested when needed

    def as_dict(self) -> dict:
        return {"bytes_copied": self.bytes_copied, "copies": self.copies, "on_demand_loads": self.waits}


class Streamer:
    """Units in pinned host memory, streamed through a ring of `slots` device buffers in execution order.

    `before(i)` makes unit i resident (waiting on its copy) and prefetches the next ones into free slots;
    `after(i)` records that the compute stream is done with unit i's slot and hands the slot on. A slot is
    reused only after the unit in it was released, so at most `slots` units are on the device at once.
    """

    def __init__(
        self,
        units: list[PackedUnit],
        device: torch.device,
        slots: int,
        name: str,
        host: HostBuffer,
        transient: bool = False,
    ):
        if not units:
            raise ConfigError(f"nothing to stream in {name}")
        self.units = units
        self.host = host  # keeps the pinned memory the units' host views point into
        self.device = device
        self.name = name
        self.slot_count = min(slots, len(units))
        self.slot_bytes = max(unit.nbytes for unit in units)
        # transient: the slots exist only while the model runs (T5, used once per prompt), so they hold no
        # memory during the denoising loop; the transformer's ring stays allocated across steps
        self.transient = transient
        self.buffers: list[torch.Tensor] | None = None if transient else self._allocate()
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._views: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.order: list[int] | None = None  # execution order of unit indices; None while it is being learnt
        self.position: dict[int, int] = {}
        self.recorded: list[int] = []
        self.stats = StreamStats()
        self.active = False
        self._reset_ring()

    def _allocate(self) -> list[torch.Tensor]:
        return [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(self.slot_count)]

    def _reset_ring(self) -> None:
        self.loaded: dict[int, object] = {}  # unit -> copy-done event (or True on the CPU)
        self.slot_of: dict[int, int] = {}
        self.owner: list[int | None] = [None] * self.slot_count
        self.in_use = [False] * self.slot_count
        self.slot_free: list[object] = [None] * self.slot_count
        self.next_slot = 0

    @property
    def device_bytes(self) -> int:
        return self.slot_bytes * self.slot_count

    def set_order(self, order: list[int]) -> None:
        self.order = list(order)
        self.position = {unit: pos for pos, unit in enumerate(self.order)}

    # --- the forward's bracket
    def begin(self) -> None:
        if self.active:  # the previous forward raised half-way: start from a clean ring
            self.reset()
        self.active = True
        if self.buffers is None:
            self.buffers = self._allocate()
        if self.order is None:
            self.recorded = []

    def end(self) -> None:
        self.active = False
        if self.transient:
            self.reset()
            self.buffers = None
            self._views.clear()
        if self.order is None and self.recorded:
            if len(set(self.recorded)) == len(self.recorded):
                self.set_order(self.recorded)
            else:
                logger.info("%s: units run more than once per forward; streaming them without prefetch", self.name)
                self.order = []

    def reset(self) -> None:
        """Release every unit and forget pending copies (after an error, or before memory is reclaimed)."""
        if self.cuda:
            self.copy_stream.synchronize()
        for unit in self.slot_of:
            self.units[unit].assign(self.units[unit].host_views)
        self._reset_ring()
        self.active = False

    # --- per unit
    def _device_views(self, unit: int, slot: int) -> list[torch.Tensor]:
        key = (unit, slot)
        if key not in self._views:
            self._views[key] = self.units[unit].views(self.buffers[slot])
        return self._views[key]

    def request(self, unit: int) -> bool:
        """Start copying `unit` into the next slot; False when that slot's unit is still in use."""
        if unit in self.loaded:
            return True
        slot = self.next_slot
        if self.in_use[slot]:
            return False
        previous = self.owner[slot]
        if previous is not None:
            self.loaded.pop(previous, None)
            self.slot_of.pop(previous, None)
        packed = self.units[unit]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                if self.slot_free[slot] is not None:
                    self.copy_stream.wait_event(self.slot_free[slot])
                self.buffers[slot][: packed.nbytes].copy_(packed.host, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.copy_stream)
        else:
            self.buffers[slot][: packed.nbytes].copy_(packed.host)
            done = True
        self.loaded[unit] = done
        self.slot_of[unit] = slot
        self.owner[slot] = unit
        self.in_use[slot] = True
        self.next_slot = (slot + 1) % self.slot_count
        self.stats.bytes_copied += packed.nbytes
        self.stats.copies += 1
        return True

    def _prefetch_after(self, unit: int) -> None:
        if not self.order or unit not in self.position:
            return
        start = self.position[unit]
        for ahead in range(1, self.slot_count):
            if self.transient and start + ahead >= len(self.order):
                break  # no wrap-around: the slots go when the model returns
            if not self.request(self.order[(start + ahead) % len(self.order)]):
                break

    def before(self, unit: int) -> None:
        if self.order is None:
            self.recorded.append(unit)
        if unit not in self.loaded:
            self.stats.waits += 1
            if not self.request(unit):
                raise RuntimeError(
                    f"{self.name}: no free slot for unit {unit} ({self.units[unit].name}); all {self.slot_count} "
                    "slots hold units still in use (a unit ran inside another one?)"
                )
        slot = self.slot_of[unit]
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.loaded[unit])
        self.units[unit].assign(self._device_views(unit, slot))
        self._prefetch_after(unit)

    def after(self, unit: int) -> None:
        slot = self.slot_of[unit]
        if self.cuda:
            free = torch.cuda.Event()
            free.record(torch.cuda.current_stream(self.device))
            self.slot_free[slot] = free
        self.units[unit].assign(self.units[unit].host_views)
        self.in_use[slot] = False
        self._prefetch_after(unit)


# ----------------------------------------------------------------------------- hooking the streamer in


class _StreamedCall:
    """What iterating a streamed ModuleList yields while its model runs: the block, bracketed."""

    __slots__ = ("streamer", "index", "module")

    def __init__(self, streamer: Streamer, index: int, module: nn.Module):
        self.streamer, self.index, self.module = streamer, index, module

    def __call__(self, *args, **kwargs):
        self.streamer.before(self.index)
        try:
            return self.module(*args, **kwargs)
        finally:
            self.streamer.after(self.index)

    def __getattr__(self, name):
        return getattr(self.module, name)


class StreamedModuleList(nn.ModuleList):
    """A ModuleList whose iteration, while its streamer is active, yields the blocks wrapped in before/after.

    Everything else (indexing, len, named_modules, state_dict, compile of each block) sees the blocks as
    they are."""

    def __iter__(self):
        streamer, first = self.__dict__.get("_stream", (None, 0))
        blocks = iter(self._modules.values())
        if streamer is None or not streamer.active:
            return blocks
        return (_StreamedCall(streamer, first + i, block) for i, block in enumerate(blocks))


def _stream_module_lists(model: nn.Module, lists: list[nn.ModuleList], streamer: Streamer) -> None:
    first = 0
    for blocks in lists:
        blocks.__class__ = StreamedModuleList
        blocks.__dict__["_stream"] = (streamer, first)
        first += len(blocks)
    _bracket(model, streamer)


def _bracket(model: nn.Module, streamer: Streamer) -> None:
    model.register_forward_pre_hook(lambda module, args: streamer.begin())
    model.register_forward_hook(lambda module, args, output: streamer.end())


def _unstream_module_lists(lists: list[nn.ModuleList]) -> None:
    for blocks in lists:
        blocks.__dict__.pop("_stream", None)
        blocks.__class__ = nn.ModuleList


# ----------------------------------------------------------------------------- whole modules in and out


class ResidentOnDemand:
    """A whole module (a text encoder) in pinned host memory, moved to the device for a call and back.

    Moving back is free: the host copy is kept, so only the device buffer is dropped."""

    def __init__(self, module: nn.Module, device: torch.device, name: str, pin: bool):
        self.module = module
        self.device = device
        self.packed = PackedUnit(name, module_tensors(module))
        self.host = HostBuffer.pack([self.packed], pin)
        self.buffer: torch.Tensor | None = None
        self.bytes_copied = 0

    def __enter__(self):
        self.buffer = torch.empty(self.packed.nbytes, dtype=torch.uint8, device=self.device)
        self.buffer.copy_(self.packed.host, non_blocking=True)
        self.packed.assign(self.packed.views(self.buffer))
        self.bytes_copied += self.packed.nbytes
        return self

    def __exit__(self, *exc):
        self.packed.assign(self.packed.host_views)
        self.buffer = None


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


# ----------------------------------------------------------------------------- the prompt cache


class PromptCache:
    """The last `size` prompts' embeddings, so a repeated prompt does not bring the text encoders back."""

    KEY_ARGS = ("prompt", "prompt_2", "num_images_per_prompt", "max_sequence_length")

    def __init__(self, size: int):
        self.size = size
        self.entries: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _freeze(value):
        return tuple(value) if isinstance(value, list) else value

    def key(self, arguments: dict, device, dtype):
        if arguments.get("prompt_embeds") is not None or arguments.get("lora_scale") is not None:
            return None  # the caller's own embeddings, or LoRA-scaled encoders: nothing to reuse
        return tuple(self._freeze(arguments.get(name)) for name in self.KEY_ARGS) + (str(device), dtype)

    def get(self, key):
        if key is None or self.size == 0 or key not in self.entries:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return self.entries[key]

    def put(self, key, value) -> None:
        if key is None or self.size == 0:
            return
        self.entries[key] = value
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


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

    def reset(self) -> None:
        """Put every streamed unit back in host memory (after an out-of-memory error, say)."""
        for streamer in self.streamers.values():
            streamer.reset()
        for holder in self.on_demand.values():
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
    _stream_module_lists(model, lists, streamer)
    return streamer


def _leaves(module: nn.Module) -> list[nn.Module]:
    """The Linear layers (bf16, fp8, nf4): the modules that always use their weights through their own forward.
    Other weights inside a block (the RMSNorm scales our fused kernels read directly) stay on the device."""
    return [m for m in module.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _leaf_groups(lists) -> list[list[nn.Module]]:
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
            key = _storage_key(entry[3])
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
    groups = _leaf_groups(lists)
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
    for index, group in enumerate(groups):
        for leaf in group:
            leaf.register_forward_pre_hook(lambda module, args, i=index: streamer.before(i))
            leaf.register_forward_hook(lambda module, args, output, i=index: streamer.after(i))
    _bracket(model, streamer)
    return streamer


def _wrap_encode_prompt(pipe, state: OffloadState, encoders: dict) -> None:
    import inspect

    original = pipe.encode_prompt
    signature = inspect.signature(original)

    def encode_prompt(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        cache = state.prompt_cache
        key = cache.key(bound.arguments, state.device, pipe.transformer.dtype) if cache else None
        cached = cache.get(key) if cache else None
        if cached is not None:
            return cached
        with encoders.get("text_encoder", _NullContext()), encoders.get("text_encoder_2", _NullContext()):
            result = original(*args, **kwargs)
        if cache:
            cache.put(key, result)
        return result

    pipe.encode_prompt = encode_prompt


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
            _move_unpacked(encoder, device, [state.streamers[name].host])
        else:
            encoders[name] = state.on_demand[name] = ResidentOnDemand(encoder, device, name, pin)
    _wrap_encode_prompt(pipe, state, encoders)
    if config.streams:
        transformer = pipe.transformer
        lists = transformer_block_lists(transformer)
        build = _blocks_streamer if config.policy == "block" else _leaf_streamer
        state.streamers["transformer"] = build(transformer, lists, device, config.blocks_resident, "transformer", pin)
        _move_unpacked(transformer, device, [state.streamers["transformer"].host])
    else:
        pipe.transformer.to(device)
    pipe.vae.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    state.setup_s = time.perf_counter() - started
    return state


def _move_unpacked(model: nn.Module, device: torch.device, hosts: list[HostBuffer]) -> None:
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


# ----------------------------------------------------------------------------- compaction


def compact(module: nn.Module, device: torch.device) -> bool:
    """Re-lay `module`'s device tensors into one contiguous device buffer (through host memory).

    Quantising on the GPU frees the bf16 weights piece by piece, and the new weights land in the holes: the
    allocator's segments end up part live, part free, and cannot be handed back. Measured under a 24 GiB cap
    (fp8 transformer + fp8 T5 resident, 2048^2): 16.3 GiB live, 8.8 GiB stuck free, out of memory. One buffer
    per component leaves no holes. Storage sharing (fused QKV views, tied embeddings) is kept.
    Returns False (and leaves the module as it is) for tensor subclasses it cannot re-lay (quanto)."""
    try:
        tensors = module_tensors(module)
    except ConfigError:
        return False
    if not tensors or any(t.device != device for _, _, _, t in tensors):
        return False
    unit = PackedUnit(type(module).__name__, tensors)
    del tensors
    host = HostBuffer.pack([unit], pin=False)  # the device copies are freed here
    if device.type == "cuda":
        torch.cuda.empty_cache()
    resident = torch.empty(unit.nbytes, dtype=torch.uint8, device=device)
    resident.copy_(host.tensor)
    unit.assign(unit.views(resident))
    return True


def compact_resident(pipe, state: OffloadState | None, device: torch.device) -> list[str]:
    """compact() every quantisable component that lives whole on the device (not streamed, not visiting)."""
    streamed = set(state.streamers) | set(state.on_demand) if state is not None else set()
    done = []
    for name in ("transformer", "text_encoder_2", "text_encoder"):
        module = getattr(pipe, name, None)
        if module is not None and name not in streamed and compact(module, device):
            done.append(name)
    return done


# ----------------------------------------------------------------------------- host-to-device bandwidth


def measure_h2d_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Pinned host -> device copy bandwidth (GB/s, median of `repeats`) and pageable for comparison."""
    if device.type != "cuda":
        return {}
    result = {}
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for label, pinned in (("pinned", True), ("pageable", False)):
        source = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        times = []
        for _ in range(repeats + 1):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(source, non_blocking=pinned)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        median = sorted(times[1:])[len(times[1:]) // 2]
        result[f"{label}_GBps"] = round(nbytes / median / 1e9, 2)
    result["bytes"] = nbytes
    return result
