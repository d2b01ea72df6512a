"""Where First-Block Cache's cost per full step goes: the same engine with the cache paused and on (threshold 0: every
step full), each step's time (CUDA events around the transformer, as engine.bench times it) beside the GPU kernel
time inside it (torch.profiler), so the GPU's idle time per step shows, and the kernels whose time grew.

    python -m benchmarks.profile_cache --res 1024 --preset fp8-compile-fastacc --out results/profile-cache.json

The hypothesis it tests (benchmarks/NOTES.md, 2026-11-29 23:48): the step's sync empties the launch queue and the
rest of the step runs launch-bound; then the idle time grows by about the cost and the kernel time does not.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from benchmarks.profiling import kernel_times
from engine import FluxEngine, preset
from engine.bench.phases import record_phases
from engine.models import synthetic_components
from engine.resolution import parse_resolution
from engine.stepcache import parse_step_cache, with_step_cache


def step_ms(pipe, height: int, width: int, steps: int) -> float:
    """The median transformer step of one call (after kernel_times' warm-up), timed as engine.bench times it."""
    with record_phases(pipe, torch.device("cuda")) as times:
        pipe("a photograph of an astronaut", height=height, width=width, num_inference_steps=steps,
             generator=torch.Generator().manual_seed(0), output_type="latent")  # fmt: skip
    return statistics.median(times.step_ms)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--res", type=parse_resolution, default=(1024, 1024))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--preset", default="fp8-compile-fastacc")
    parser.add_argument("--cache", default="fbcache:0")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    height, width = args.res
    config = with_step_cache(preset(args.preset), parse_step_cache(args.cache))
    components = synthetic_components("flux-dev", device="cuda", dtype=torch.bfloat16, seed=0)
    pipe = FluxEngine.from_pipe(FluxEngine(**components), config)
    pipe.set_progress_bar_config(disable=True)
    figures = {}
    for name in ("paused", "cached"):
        if name == "paused":
            with pipe.step_cache_state.paused():
                kernels = kernel_times(pipe, height, width, args.steps)
                wall = step_ms(pipe, height, width, args.steps)
        else:
            kernels = kernel_times(pipe, height, width, args.steps)
            wall = step_ms(pipe, height, width, args.steps)
        busy = sum(ms for ms, _ in kernels.values())
        figures[name] = {"step_ms": wall, "kernel_ms_per_step": busy, "idle_ms_per_step": wall - busy,
                         "kernels": kernels}  # fmt: skip
    paused, cached = figures["paused"]["kernels"], figures["cached"]["kernels"]
    growth = sorted(((cached.get(n, (0, 0))[0] - paused.get(n, (0, 0))[0], n) for n in set(paused) | set(cached)),
                    reverse=True)  # fmt: skip
    result = {
        "preset": args.preset, "cache": args.cache, "res": [height, width], "device": torch.cuda.get_device_name(),
        **{f"{name}_{key}": figures[name][key] for name in figures for key in ("step_ms", "kernel_ms_per_step",
                                                                              "idle_ms_per_step")},
        "grown_kernels": [(round(ms, 3), name) for ms, name in growth[:30]],
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name in figures:
        print(f"{name}: step {figures[name]['step_ms']:.1f} ms = kernels {figures[name]['kernel_ms_per_step']:.1f} "
              f"+ idle {figures[name]['idle_ms_per_step']:.1f}")  # fmt: skip
    for ms, name in result["grown_kernels"][:15]:
        print(f"{ms:+8.3f} ms  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
