"""The VAE under torch.compile (`VaeConfig(compile=True)`; the fastest presets have it).

The decode is a fixed cost of every image that step caching does not touch: 0.09 s of a 0.79 s TaylorSeer image at
1024^2 on the H200, 0.4 s at 2048^2, in eager bf16 at ~120 TFLOP/s. Under torch.compile inductor fuses each GroupNorm
with its SiLU and the convolutions run channels_last: 87 -> 36 ms at 1024^2 and 396 -> 190 ms at 2048^2, and less
memory (NOTES 2026-11-30 18:20). Eager channels_last alone was 1.6x slower (eager GroupNorm copies NHWC back to NCHW,
NOTES 2026-11-26), which is why the layout comes with the compile and not on its own.

- Dynamic sizes: one graph for every image size (no recompile when the size changes): the height and width of the
  input are marked dynamic, each its own symbol, while no frame exists yet (`dynamic=True` gives equal sizes one
  symbol, so a square first image made a non-square one recompile; with `dynamic=True` inductor's frames also met
  an identity guard that cannot be saved). A saved frame's guards expect an unmarked input (torch keeps no record
  of the marking in a saved guard), so a process that loaded one does not mark. Inductor turns its own layout
  optimisation off under dynamic sizes (pytorch#102670), so the weights are made channels_last here: a convolution
  with channels_last weights writes channels_last whatever its input's layout.
- The decoder and the encoder each compile on first use (every call's decode; an image-to-image call's encode), in
  the engine's cache folders when the compile step has some (engine.compile); the decoder's first call writes the
  artefacts again, its graphs with the transformer's (the artefact key counts vae.compile). Where the compile step
  keeps frames (engine.frames), each part is a frame too, saved in the same file: tracing the decoder with symbolic
  sizes takes seconds (4.5 s for the tiny one on this project's CPU), which a warm start would otherwise pay.
- `remove_compile` undoes it: the parts run eagerly again, their weights contiguous again.
"""

from __future__ import annotations

import logging

import torch

from .compile import CompileState, compiler_caches, save_artifacts

logger = logging.getLogger(__name__)


def compile_vae(pipe, config, state: CompileState | None) -> CompileState:
    """Compile `pipe.vae`'s decoder and encoder per the module docstring, recording them in `state` (the compile
    step's, or a new one where the transformer is not compiled); returns the state."""
    state = state or CompileState(cache_dir=None, artifact_path=None)
    backend = config.compile.backend if config.compile.mode != "none" else "inductor"
    kwargs = {"fullgraph": True, "backend": backend}
    for name in ("decoder", "encoder"):
        module = getattr(pipe.vae, name)
        module.to(memory_format=torch.channels_last)
        state.handles.append(_ContiguousAgain(module))
        frame = None
        if state.frames is not None:  # the frame ahead of time: a warm start does not trace the part again
            state.frames.install(module, kwargs)
            call, frame = module._call_impl, module.forward.frame  # its forward is the frame now
        else:
            call = torch.compile(module._call_impl, **kwargs)
        module._compiled_call_impl = _ScopedCall(call, state, name == "decoder", frame)  # as nn.Module.compile does
        state.modules.append(module)
        state.compiled_modules.append(f"vae.{name}")
    return state


class _ScopedCall:
    """A compiled VAE part's call: its input's height and width marked dynamic, inside the engine's cache folders;
    then the frames made by the call saved, and with `save` the artefacts written once after the first call, where
    this process made them (none were loaded for the key)."""

    def __init__(self, call, state: CompileState, save: bool, frame=None):
        self.call, self.state, self.save, self.frame = call, state, save, frame

    def __call__(self, sample: torch.Tensor, *args, **kwargs):
        if self.frame is None or not (self.frame.variants or self.frame.saved):
            sample = sample.detach()  # another tensor object (the same data): the caller's is left unmarked
            for dim in (2, 3):  # height and width, each its own symbol
                torch._dynamo.maybe_mark_dynamic(sample, dim)
        with compiler_caches(self.state.cache_dir):
            output = self.call(sample, *args, **kwargs)
        state = self.state
        try:
            if state.frames is not None and state.frames_path is not None and state.frames.unsaved():
                state.saved_frames = state.frames.save(state.frames_path)
            if self.save:
                self.save = False
                if state.artifact_path is not None and not state.loaded_artifacts:
                    state.saved_artifacts = save_artifacts(state.artifact_path)
        except OSError as err:  # this process keeps what it compiled in memory
            logger.warning("could not write the compile cache under %s: %s", state.cache_dir, err)
        return output


class _ContiguousAgain:
    """remove_compile's handle that puts a compiled VAE part's weights back in the contiguous layout."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def remove(self) -> None:
        self.module.to(memory_format=torch.contiguous_format)
