"""The VAE under torch.compile (`VaeConfig(compile=True)`; opt-in: the preset
`fp8-compile-fastacc-cudagraphs-cudnnattn-compiledvae` has it).

The decode is a fixed cost of every image that step caching does not touch: 0.09 s of a 0.79 s TaylorSeer image at
1024^2 on the H200, 0.4 s at 2048^2, in eager bf16 at ~120 TFLOP/s. Under torch.compile inductor fuses each GroupNorm
with its SiLU: 87 -> 46 ms at 1024^2 and 396 -> 204 ms at 2048^2 with the sizes dynamic as here (36 / 190 ms static),
and less memory (NOTES 2026-11-30 18:20, 18:45). Eager channels_last alone was 1.6x slower (eager GroupNorm copies
NHWC back to NCHW, NOTES 2026-11-26), which is why the layout comes with the compile and not on its own.
Since 2026-11-30 22:22 the eager decode with the engine's VAE kernels (`VaeConfig(kernels=True)`, engine.vae_kernels,
in the fastest presets) is faster than this one, without a compile: 37 / 138 ms against 43 / 158 (with those kernels
here too) at 1024^2 / 2048^2; 28 / 104 ms since 2026-12-01.

The price is the start (H200, NOTES 2026-11-30 19:10): the decoder's first compile took ~45 s, and a warm process
traced and compiled it again (16-21 s, measured with the frame tried below; this plain path's warm start is not
measured yet): a server that starts once gains 40 ms (1024^2) to 190 ms (2048^2) an image; a process that makes a few
images does not. Hence opt-in. Its compile artefacts (~55 MB a key) are too large to ship.

- Dynamic sizes: one graph for every image size (no recompile when the size changes): the height and width of the
  input are marked dynamic, each its own symbol, on a copy of the caller's tensor (`dynamic=True` gives equal sizes
  one symbol, so a square first image made a non-square one recompile). Inductor turns its own layout optimisation
  off under dynamic sizes (pytorch#102670), so the weights are made channels_last here: a convolution with
  channels_last weights writes channels_last whatever its input's layout.
- The decoder and the encoder each compile on first use (every call's decode; an image-to-image call's encode), in
  the engine's cache folders when the compile step has some (engine.compile); the decoder's first call writes the
  artefacts again, its graphs with the transformer's (the artefact key counts vae.compile).
- Not a frame ahead of time (engine.frames): made and loaded on the CPU (tiny model), but on the H200 the next
  process's decoder did not pass the saved frame's guards and made another (without the marking: then a new size
  recompiled); the guard that fails is not known yet (NOTES 2026-11-30 19:10).
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
        call = torch.compile(module._call_impl, **kwargs)  # not a frame (engine.frames): see the module docstring
        module._compiled_call_impl = _ScopedCall(call, state, name == "decoder")  # as nn.Module.compile does
        state.modules.append(module)
        state.compiled_modules.append(f"vae.{name}")
    return state


class _ScopedCall:
    """A compiled VAE part's call: its input's height and width marked dynamic, inside the engine's cache folders;
    with `save`, the artefacts written once after the first call, where this process made them (none were loaded for
    the key)."""

    def __init__(self, call, state: CompileState, save: bool):
        self.call, self.state, self.save = call, state, save

    def __call__(self, sample: torch.Tensor, *args, **kwargs):
        if not sample.requires_grad:  # another tensor object (the same data): the caller's is left unmarked
            sample = sample.detach()
        for dim in (2, 3):  # height and width, each its own symbol
            torch._dynamo.maybe_mark_dynamic(sample, dim)
        with compiler_caches(self.state.cache_dir):
            output = self.call(sample, *args, **kwargs)
        state = self.state
        try:
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
