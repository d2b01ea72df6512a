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
  method, class or module, whose lines the checksums cover), and a frame that needs any other is not made.
Anything else (a guard failing, adapters wrapping the layers, another size class) runs the frame compiled the usual
way, as `nn.Module.compile` would: the module's hooks run around either.
"""

from __future__ import annotations

import functools
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
    changed = []
    for source in compiled.source_info().inlined_sources:
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


class Frame:
    """One module class's forward, compiled: the ahead-of-time frame where one was loaded or made and its guards pass,
    else compiled the usual way (`fallback`: dynamo's cache, recompiling as it would). The saved frame is loaded on
    the first call (inside the forward's compiler caches, and counted in the first call's time, as tracing was)."""

    def __init__(self, forward, compile_kwargs: dict, saved: bytes | None = None):
        self.forward = forward  # the class's function: its frame is the one compiled
        self.compile_kwargs = compile_kwargs
        self.saved = saved  # the frame as read from a file, loaded on the first call
        self.compiled = None  # torch's AOTCompiledFunction
        self.origin = "usual"  # 'file' or 'made' once the first call loaded or made it
        self.refused = ""  # why the saved frame was not used
        self.data: bytes | None = None  # the saved form of a frame made here, for the file
        self.first = True
        self.fallback = torch.compile(forward, **compile_kwargs)
        self.runs = 0  # calls the ahead-of-time frame ran
        self.fallbacks = 0  # calls it could not take

    def __call__(self, module, *args, **kwargs):
        if self.first:
            self.first = False
            if self.saved is not None:
                self._load()
            if self.compiled is None:
                self._make(module, args, kwargs)
        if self.compiled is not None and self.compiled.guard_check(module, *args, **kwargs):
            self.runs += 1
            return self.compiled(module, *args, **kwargs)
        self.fallbacks += 1
        return self.fallback(module, *args, **kwargs)

    def _load(self) -> None:
        try:
            self.compiled = _deserialize(self.saved, self.forward)
        except Exception as err:  # noqa: BLE001 - a stale or foreign frame must never stop the engine
            self.refused = str(err)
            logger.info("saved frame %s not used: %s", self.forward.__qualname__, err)
            return
        self.origin = "file"

    def _make(self, module, args: tuple, kwargs: dict) -> None:
        options = {**self.compile_kwargs.get("options", {}), "guard_filter_fn": keep_guard}
        try:
            with _aot_enabled():
                compiled = torch.compile(self.forward, **{**self.compile_kwargs, "options": options}).aot_compile(
                    ((module, *args), kwargs)
                )
        except Exception as err:  # noqa: BLE001 - the usual compile takes over; the reason is logged
            self.refused = self.refused or str(err)
            logger.info("frame %s compiled the usual way, not ahead of time: %s", self.forward.__qualname__, err)
            return
        self.compiled = _checked_once(compiled)
        self.origin = "made"
        try:
            self.data = _serialize(compiled)
        except Exception as err:  # noqa: BLE001 - used in this process, not saved
            logger.info("frame %s not saved: %s", self.forward.__qualname__, err)


class Frames:
    """The ahead-of-time frames of one compile state: read from a `.frames` file, made on first calls, saved."""

    def __init__(self, saved: dict[str, bytes] | None = None):
        self.saved = dict(saved or {})  # name -> bytes, as read from the file
        self.frames: dict[str, Frame] = {}
        self.modules: list[torch.nn.Module] = []

    def install(self, module: torch.nn.Module, compile_kwargs: dict) -> None:
        """`module`'s forward runs its class's frame (instead of nn.Module.compile); undone by uninstall."""
        cls = type(module)
        name = frame_name(cls)
        frame = self.frames.get(name)
        if frame is None:
            frame = self.frames[name] = Frame(cls.forward, compile_kwargs, self.saved.get(name))
        module.forward = functools.partial(frame, module)
        self.modules.append(module)

    def reload(self, saved: dict[str, bytes]) -> None:
        """Forget every frame loaded or made in this process: the next call of each loads it from `saved` (a new
        process's warm start, for engine.bench's warm-compile figure; torch._dynamo.reset does not reach them)."""
        self.saved = dict(saved)
        for name, frame in self.frames.items():
            frame.saved, frame.compiled, frame.data = self.saved.get(name), None, None
            frame.first, frame.origin, frame.refused = True, "usual", ""

    def uninstall(self) -> None:
        for module in self.modules:
            forward = module.__dict__.get("forward")
            if isinstance(forward, functools.partial) and isinstance(forward.func, Frame):
                del module.forward
        self.modules.clear()

    def stats(self) -> dict:
        """Per frame: where it came from ('file', 'made' here, 'usual': compiled as nn.Module.compile would), why a
        saved or made frame was not used, and how many calls ran it or fell back to the usual compile."""
        return {
            name: {"from": f.origin, "refused": f.refused, "runs": f.runs, "fallbacks": f.fallbacks}
            for name, f in self.frames.items()
        }

    def unsaved(self) -> bool:
        return any(f.data is not None for f in self.frames.values())

    def save(self, path: Path) -> bool:
        """Every frame with a saved form into `path` (a zip, one entry a frame), written whole or not at all."""
        stale = {name for name, f in self.frames.items() if not f.first and f.origin != "file"}
        entries = {name: data for name, data in self.saved.items() if name not in stale}
        entries.update({name: f.data for name, f in self.frames.items() if f.data is not None})
        if not entries:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as bundle:
            for name, data in sorted(entries.items()):
                bundle.writestr(name, data)
        os.replace(tmp, path)
        self.saved = entries
        for frame in self.frames.values():
            frame.data = None
        return True


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
