"""The compiled regions' traced frames, saved ahead of time, so that a warm start does not trace them again.

With inductor's artefacts in the cache (engine.compile), a warm start still spent ~2.2 of its ~2.9 s in dynamo on
the H200: tracing each compiled frame (the double and single blocks, the time embedder, the final norm) with
symbolic sizes before inductor's cache could answer (NOTES 2026-11-30 11:55). torch's ahead-of-time compile
(`torch.compile(fn).aot_compile`) keeps a traced frame, its guards and inductor's code together: made on the first
call, saved beside the artefacts (`<key>.frames`) and loaded by the next process, a frame runs without tracing.

A loaded frame runs only where
- it was made for the same versions, device and config: the file carries the artefacts' key (engine.compile), and
  torch checks its own version and the device when it loads it;
- every source line it traced is unchanged: dynamo records each function it inlined with a checksum of its lines;
  an edited engine, diffusers or PEFT function makes the file stale, and it is ignored;
- its guards pass on each call (tensor sizes, dtypes and strides, module types, the attributes the trace read).
  torch cannot save guards on an object's identity; they are left out only where the object is code (a function,
  method, class or module, whose lines the checksums cover), and a frame that needs any other is not made (the file
  says so, and later processes compile that class the usual way without trying).
Where no saved frame's guards pass (adapters wrapping the layers, another structure), the call makes another variant
of the frame, saved beside the first (up to MAX_VARIANTS a class), so a server that loads a LoRA before its first call
starts warm too; past that, the frame compiles the usual way, as `nn.Module.compile` would. The module's hooks run
around either.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import logging
import os
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import torch

from .files import write_atomically

logger = logging.getLogger(__name__)

# torch._dynamo.guards.CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES: guards on identities
IDENTITY_GUARDS = frozenset(
    {"ID_MATCH", "FUNCTION_MATCH", "CLASS_MATCH", "MODULE_MATCH", "CLOSURE_MATCH", "WEAKREF_ALIVE"}
)
CODE_OBJECTS = (
    types.FunctionType,
    types.MethodType,
    types.BuiltinFunctionType,
    types.CodeType,
    types.ModuleType,
    type,
    torch._ops.OpOverload,  # an operator, looked up by its name when the frame runs
    torch._ops.OpOverloadPacket,
)


class FrameRefused(Exception):
    """A frame whose guards include the identity of an object that is not code: it is not saved."""


def keep_guard(entries) -> list[bool]:
    """torch.compile's guard_filter_fn for a frame made ahead of time: every guard but those on code's identity."""
    keep = []
    for entry in entries:
        derived = getattr(entry, "derived_guard_types", None)  # torch 2.11's entries may lack it: the guard's own
        if derived is None and entry.orig_guard is not None:
            derived = entry.orig_guard.guard_types
        kinds = {entry.guard_type, *(derived or ())}
        if not kinds & IDENTITY_GUARDS:
            keep.append(True)
            continue
        logger.debug("identity guard %s on %s", entry.guard_type, entry.name)
        if not entry.has_value or not isinstance(entry.value, CODE_OBJECTS):
            value = type(entry.value).__name__ if entry.has_value else "an unknown object"
            raise FrameRefused(f"{entry.guard_type} guard on {entry.name} (the identity of {value})")
        keep.append(False)
    return keep


def frame_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _lines_checksum(module_name: str, first: int, last: int) -> str:
    """dynamo's checksum of a traced function's lines (torch._dynamo.package._hash_sourcelines)."""
    lines = inspect.getsourcelines(importlib.import_module(module_name))[0][first - 1 : last - 1]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def changed_sources(compiled) -> list[str]:
    """The traced functions of `compiled` (an AOTCompiledFunction) whose lines are not what they were."""
    return _changed(compiled.source_info().inlined_sources)


def _changed(sources, modules: tuple[str, ...] = ("",)) -> list[str]:
    """Of dynamo's inlined sources, those in `modules` (name prefixes) whose lines' checksum is not what it was."""
    changed = []
    for source in sources:
        if not source.module.startswith(modules):
            continue
        try:
            same = _lines_checksum(source.module, source.firstlineno, source.lastlineno) == source.checksum
        except (ImportError, OSError, TypeError):
            same = False
        if not same:
            changed.append(f"{source.module} lines {source.firstlineno}-{source.lastlineno}")
    return changed


def _aot_enabled():
    # torch 2.11 has the API behind this switch (on by default in later versions)
    return torch._dynamo.config.patch(enable_aot_compile=True)


def _serialize(compiled) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "frame")
        compiled.save_compiled_function(path)
        return Path(path).read_bytes()


def _checked_once(compiled):
    """`compiled`, its own guard check off: Frame checks the guards once per call, before choosing it."""
    if hasattr(compiled, "disable_guard_check"):
        compiled.disable_guard_check()
    return compiled


def _deserialize(data: bytes, forward):
    with _aot_enabled():
        compiled = torch.compiler.load_compiled_function(
            io.BytesIO(data), f_globals=sys.modules[forward.__module__].__dict__
        )
    stale = changed_sources(compiled)
    if stale:
        raise FrameRefused(f"its traced sources changed since it was made: {', '.join(stale[:3])}")
    return _checked_once(compiled)


MAX_VARIANTS = 4  # frames kept per class (the plain blocks, the blocks with adapters, ...); past it the usual compile
REFUSED = "!refused"  # the entry that says a class's frame cannot be made (and why): later processes do not try


class Frame:
    """One module class's forward, compiled: the first ahead-of-time variant whose guards pass (loaded from a file or
    made here), else a new variant made from the call (up to `max_variants`), else compiled the usual way
    (`fallback`: dynamo's cache, recompiling as it would). Saved variants load on the first call (inside the forward's
    compiler caches, and counted in the first call's time, as tracing was)."""

    def __init__(self, forward, compile_kwargs: dict, saved: list[bytes] = (), refused: str = "", max_variants=None):
        self.forward = forward  # the class's function: its frame is the one compiled
        self.compile_kwargs = compile_kwargs
        self.max_variants = MAX_VARIANTS if max_variants is None else max_variants
        self.fallback = torch.compile(forward, **compile_kwargs)
        self.reset(saved, refused)

    def reset(self, saved: list[bytes] = (), refused: str = "") -> None:
        """As a new process finds it: `saved` variants to load on the first call, a refusal an earlier one met."""
        self.saved = list(saved)
        self.variants: list = []  # torch's AOTCompiledFunction, each with its guards
        self.kept: list[bytes] = []  # the saved forms of the variants loaded from the file
        self.new: list[bytes] = []  # the saved forms of the variants made here, for the file
        self.refused = refused  # why a variant cannot be made for this class (then none is tried)
        self.lasting = bool(refused)  # a refusal of the code itself (guards torch cannot save): kept in the file
        self.refused_here = False  # a lasting refusal found in this process: to be written to the file
        self.stale = ""  # why a saved variant was not used
        self.unsaved = ""  # why a variant made here could not be saved
        self.first = True
        self.runs = 0  # calls an ahead-of-time variant ran
        self.fallbacks = 0  # calls none could take
        self.tries = 0  # variants this process tried to make
        self.loaded = 0  # variants loaded from the file
        self.made = 0  # variants made here

    @property
    def origin(self) -> str:
        """'file' (a variant loaded), 'made' (variants made here only) or 'usual' (compiled as nn.Module.compile)."""
        return "file" if self.loaded else "made" if self.made else "usual"

    def __call__(self, module, *args, **kwargs):
        if self.first:
            self.first = False
            for data in self.saved:
                self._load(data)
        for variant in self.variants:
            if variant.guard_check(module, *args, **kwargs):
                self.runs += 1
                return variant(module, *args, **kwargs)
        if not self.refused and len(self.variants) < self.max_variants and self._make(module, args, kwargs):
            variant = self.variants[-1]
            if variant.guard_check(module, *args, **kwargs):  # made from these inputs: its guards hold
                self.runs += 1
                return variant(module, *args, **kwargs)
        self.fallbacks += 1
        return self.fallback(module, *args, **kwargs)

    def _load(self, data: bytes) -> None:
        try:
            variant = _deserialize(data, self.forward)
        except Exception as err:  # noqa: BLE001 - a stale or foreign frame must never stop the engine
            self.stale = str(err)
            logger.info("saved frame %s not used: %s", self.forward.__qualname__, err)
            return
        self.variants.append(variant)
        self.kept.append(data)
        self.loaded += 1

    def _make(self, module, args: tuple, kwargs: dict) -> bool:
        self.tries += 1
        options = {**self.compile_kwargs.get("options", {}), "guard_filter_fn": keep_guard}
        try:
            compiled = _aot_compile(self.forward, {**self.compile_kwargs, "options": options}, module, args, kwargs)
        except Exception as err:  # noqa: BLE001 - the usual compile takes over; the reason is logged and kept
            self.refused = str(err) or type(err).__name__
            self.lasting = self.refused_here = _lasting(err)
            logger.info("frame %s compiled the usual way, not ahead of time: %s", self.forward.__qualname__, err)
            return False
        self.variants.append(_checked_once(compiled))
        self.made += 1
        try:
            self.new.append(_serialize(compiled))
        except Exception as err:  # noqa: BLE001 - used in this process, not saved
            self.unsaved = str(err) or type(err).__name__
            logger.info("frame %s not saved: %s", self.forward.__qualname__, err)
        return True

    def entries(self, name: str) -> dict[str, bytes]:
        """The file's entries of this class: its variants (name, name#1, ...) and the refusal it met, if any."""
        entries = {name if index == 0 else f"{name}#{index}": data for index, data in enumerate(self.kept + self.new)}
        if self.lasting:
            entries[name + REFUSED] = self.refused.encode()
        return entries


def _aot_compile(forward, compile_kwargs: dict, module, args: tuple, kwargs: dict, attempts: int = 3):
    """torch's aot_compile of `forward` on these inputs. Dynamo's usual compile traces a frame again when its analysis
    asks to restart (a float it first made symbolic to be a constant, with the LoRA scales' arithmetic); aot_compile
    does not, so the restart is made here (what dynamo learned in the failed trace is kept for the next)."""
    for attempt in range(attempts):
        try:
            with _aot_enabled():
                return torch.compile(forward, **compile_kwargs).aot_compile(((module, *args), kwargs))
        except torch._dynamo.exc.RestartAnalysis:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _lasting(err: BaseException) -> bool:
    """Whether a frame could not be made because of what the code guards (an identity torch cannot save): it would be
    refused again in every process. Anything else (memory, a compiler error) is tried again by the next one."""
    unsaveable = getattr(torch._dynamo.exc, "PackageError", FrameRefused)  # torch's "guard cannot be serialized"
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (FrameRefused, unsaveable)):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


class BoundFrame:
    """A module's `forward` while its class's Frame compiles it. Dynamo pickles the module with a frame's guards (the
    module's own attributes), and a frame holds torch's guard managers, which do not pickle: this pickles as the
    class's own forward instead."""

    __slots__ = ("frame", "module")

    def __init__(self, frame: Frame, module: torch.nn.Module):
        self.frame, self.module = frame, module

    def __call__(self, *args, **kwargs):
        return self.frame(self.module, *args, **kwargs)

    def __reduce__(self):
        return getattr, (type(self.module), "forward")


def _split(saved: dict[str, bytes], name: str) -> tuple[list[bytes], str]:
    """A class's saved variants in their order, and the refusal an earlier process met, from a file's entries."""
    variants = [saved[key] for key in sorted((k for k in saved if k == name or k.startswith(name + "#")),
                                             key=lambda k: int(k.partition("#")[2] or 0))]  # fmt: skip
    refused = saved.get(name + REFUSED, b"").decode(errors="replace")
    return variants, refused


class Frames:
    """The ahead-of-time frames of one compile state: read from a `.frames` file, made on first calls, saved."""

    def __init__(self, saved: dict[str, bytes] | None = None, max_variants: int | None = None):
        self.saved = dict(saved or {})  # entry -> bytes, as read from the file
        self.max_variants = max_variants
        self.frames: dict[str, Frame] = {}
        self.modules: list[torch.nn.Module] = []

    def install(self, module: torch.nn.Module, compile_kwargs: dict) -> None:
        """`module`'s forward runs its class's frame (instead of nn.Module.compile); undone by uninstall."""
        cls = type(module)
        name = frame_name(cls)
        frame = self.frames.get(name)
        if frame is None:
            variants, refused = _split(self.saved, name)
            frame = self.frames[name] = Frame(cls.forward, compile_kwargs, variants, refused, self.max_variants)
        module.forward = BoundFrame(frame, module)
        self.modules.append(module)

    def reload(self, saved: dict[str, bytes]) -> None:
        """Forget every frame loaded or made in this process: the next call of each loads it from `saved` (a new
        process's warm start, for engine.bench's warm-compile figure; torch._dynamo.reset does not reach them)."""
        self.saved = dict(saved)
        for name, frame in self.frames.items():
            frame.reset(*_split(self.saved, name))

    def uninstall(self) -> None:
        for module in self.modules:
            forward = module.__dict__.get("forward")
            if isinstance(forward, BoundFrame):
                del module.forward
        self.modules.clear()

    def stats(self) -> dict:
        """Per class: where its frames came from ('file', 'made' here, 'usual': compiled as nn.Module.compile would),
        how many variants it loaded and made, why one was refused or not used or could not be saved, and the calls
        each way."""
        return {
            name: {"from": f.origin, "loaded": f.loaded, "made": f.made, "tries": f.tries,
                   "refused": f.refused or f.stale, "unsaved": f.unsaved, "runs": f.runs, "fallbacks": f.fallbacks}
            for name, f in self.frames.items()
        }  # fmt: skip

    def unsaved(self) -> bool:
        return any(f.new or f.refused_here for f in self.frames.values())

    def save(self, path: Path) -> bool:
        """Every class's variants (and refusal) into `path` (a zip, one entry each), written whole or not at all;
        the classes this process did not run keep their entries."""
        entries = {}
        for key, data in self.saved.items():
            frame = self.frames.get(key.split("#")[0].split("!")[0])
            if frame is None or frame.first:
                entries[key] = data
        for name, frame in self.frames.items():
            if not frame.first:
                entries.update(frame.entries(name))
        if not entries:
            return False

        def write(tmp: Path) -> None:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as bundle:
                for name, data in sorted(entries.items()):
                    bundle.writestr(name, data)

        write_atomically(path, write)
        self.saved = entries
        for frame in self.frames.values():
            frame.kept, frame.new, frame.refused_here = frame.kept + frame.new, [], False
        return True


def stale_sources(path: Path, modules: tuple[str, ...] = ("engine.", "flux_kernels.")) -> dict[str, list[str]]:
    """{frame name: its traced functions in `modules` whose lines changed since it was made} for a frames file
    (`<key>.frames`), read from each frame's pickled source info without loading the frame, so that a CPU can check
    a GPU's file; frames with none changed are left out. An edit that moves a traced function's lines (a kernel
    file's host code above it, say) makes the shipped frame stale: remake it."""
    import pickle

    stale = {}
    for name, data in read_frames(path).items():
        if name.endswith(REFUSED):  # a class's refusal note, not a frame
            continue
        changed = _changed(pickle.loads(data)["source_info"].inlined_sources, modules)  # our own shipped file
        if changed:
            stale[name] = changed
    return stale


def read_frames(path: Path) -> dict[str, bytes]:
    """The frames saved in `path` by name; {} where there is none or it cannot be read."""
    if not path.is_file():
        return {}
    try:
        with zipfile.ZipFile(path) as bundle:
            return {name: bundle.read(name) for name in bundle.namelist()}
    except (OSError, zipfile.BadZipFile) as err:
        logger.warning("ignoring unreadable frames file %s: %s", path, err)
        return {}
