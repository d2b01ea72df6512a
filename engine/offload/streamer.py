"""Packing a block's (or a Linear's) tensors into one pinned host buffer, streaming the packed units through a
ring of GPU slots on a side stream, the hooks that bring them in as the model iterates its blocks, and whole
modules visiting the GPU on demand."""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError

logger = logging.getLogger(__name__)

ALIGN_BYTES = 256  # every packed storage starts on a 256-byte boundary (what the CUDA allocator gives)


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


def quant_state_tensors(state, seen: set) -> list[tuple[object, str, str, torch.Tensor]]:
    """The tensors of a bitsandbytes QuantState (absmax, code, offset, and its nested state2)."""
    if id(state) in seen:
        return []
    seen.add(id(state))
    found = []
    for name, value in vars(state).items():
        if isinstance(value, torch.Tensor):
            found.append((state, name, "attr", value))
        elif type(value).__name__ == "QuantState":
            found.extend(quant_state_tensors(value, seen))
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
                found.extend(quant_state_tensors(state, seen_states))
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

    def materialize(self, device: torch.device) -> None:
        """Give the unit's tensors a buffer of their own on `device`, for good (undoing the offload): a copy of the
        host buffer, laid out as it is, so shared storages stay shared and every value stays the same."""
        self.assign(self.views(self.host.to(device, copy=True)))

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor of the unit as a view of `flat`, a uint8 buffer laid out like the host buffer."""
        views = []
        for slot in self.slots:
            base = flat[slot.offset : slot.offset + slot.storage_bytes].view(slot.dtype)
            # as_strided's offset counts from the start of the whole buffer's storage, not from `base`
            views.append(torch.as_strided(base, slot.shape, slot.stride, base.storage_offset() + slot.storage_offset))
        return views

    def adopt_replaced(self) -> bool:
        """Tensors given new ones since packing (`.to()` there and back, an assign load) copied into the host buffer,
        the host views put back: the unit streams what the model holds (before: the packed values, without a word).
        True if any was; one of another dtype or shape is refused, naming the fix."""
        replaced = False
        for slot, view in zip(self.slots, self.host_views, strict=True):
            if slot.kind == "param":
                current = slot.owner._parameters[slot.name]
            else:
                current = slot.owner._buffers[slot.name] if slot.kind == "buffer" else getattr(slot.owner, slot.name)
            if current is None or current.data_ptr() == view.data_ptr():
                continue
            if current.dtype != view.dtype or current.shape != view.shape:
                raise ConfigError(f"{self.name}: {type(slot.owner).__name__}.{slot.name} streams from host memory as "
                                  f"{view.dtype} {tuple(view.shape)}, and something made it {current.dtype} "
                                  f"{tuple(current.shape)} after optimize() (a .to(dtype)? diffusers' from_pipe makes "
                                  "every component it shares float32 unless given torch_dtype): the streamed blocks "
                                  f"keep their layout. Convert it back (pipe.to({view.dtype}); from_pipe(pipe, "
                                  f"torch_dtype={view.dtype})), or load it in that dtype and optimize it")  # fmt: skip
            view.copy_(current.detach())
            replaced = True
        if replaced:
            self.assign(self.host_views)
        return replaced

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
    @torch.compiler.disable  # a transformer compiled whole runs the ring's bookkeeping eagerly
    def begin(self) -> None:
        if self.active:  # the previous forward raised half-way: start from a clean ring
            self.reset()
        if any([unit.adopt_replaced() for unit in self.units]):  # every unit: each adopts its own
            self.reset()  # the ring's prefetched copies hold the old values
        self.active = True
        if self.buffers is None:
            self.buffers = self._allocate()
        if self.order is None:
            self.recorded = []

    @torch.compiler.disable
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

    @torch.compiler.disable
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

    @torch.compiler.disable
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

    # a transformer compiled whole: this frame runs eagerly (one per block, it would be compiled once a block index),
    # the block's own forward inside it compiled as usual
    @torch.compiler.disable(recursive=False)
    def __call__(self, *args, **kwargs):
        self.streamer.before(self.index)
        try:
            return self.module(*args, **kwargs)
        finally:
            self.streamer.after(self.index)

    def __getattr__(self, name):
        if name in _StreamedCall.__slots__:  # not set yet (dynamo builds the object before its __init__ runs)
            raise AttributeError(name)
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


def stream_module_lists(model: nn.Module, lists: list[nn.ModuleList], streamer: Streamer) -> list:
    """Swap the lists' class so that iterating them streams their blocks; returns the hooks it registered."""
    first = 0
    for blocks in lists:
        blocks.__class__ = StreamedModuleList
        blocks.__dict__["_stream"] = (streamer, first)
        first += len(blocks)
    return bracket(model, streamer)


def bracket(model: nn.Module, streamer: Streamer) -> list:
    return [
        model.register_forward_pre_hook(lambda module, args: streamer.begin()),
        model.register_forward_hook(lambda module, args, output: streamer.end()),
    ]


def unstream_module_lists(lists: list[nn.ModuleList]) -> None:
    for blocks in lists:
        blocks.__dict__.pop("_stream", None)
        blocks.__class__ = nn.ModuleList


# ----------------------------------------------------------------------------- whole modules in and out
