"""Where an active LoRA adapter's time goes: GPU kernel time per kernel name, one config without the adapter and
then with it (same process, same weights), and the kernels whose time grew most, from torch.profiler.

    python -m benchmarks.profile_lora --res 1024 --rank 64 --preset fp8-compile-fastacc --out results/profile-lora.json

2 steps profiled after a warm-up call; under CUDA graphs the profiler (CUDA 12+) still sees each kernel of a replayed
graph. The JSON also lists the largest kernels without the adapter (where the step's own time goes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from benchmarks.profiling import by_kind, kernel_times
from engine import FluxEngine, preset
from engine.lora import synthetic_lora
from engine.models import synthetic_components
from engine.resolution import parse_resolution


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--res", type=parse_resolution, default=(1024, 1024))
    parser.add_argument("--rank", type=int, default=64, help="the adapter's rank; 0: the step without an adapter only")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--preset", default="fp8-compile-fastacc")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="the preset without its CUDA graphs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    config = preset(args.preset)
    if args.no_cuda_graphs:
        config = dataclasses.replace(config, compile=dataclasses.replace(config.compile, cuda_graphs=False))
    height, width = args.res
    if args.rank < 0:
        parser.error(f"--rank {args.rank}: the adapter's rank is >= 1, or 0 for no adapter")
    components = synthetic_components("flux-dev", device="cuda", dtype=torch.bfloat16, seed=0)
    adapter = synthetic_lora(components["transformer"], args.rank, seed=1) if args.rank else None
    pipe = FluxEngine.from_pipe(FluxEngine(**components), config)
    pipe.set_progress_bar_config(disable=True)
    without = kernel_times(pipe, height, width, args.steps)
    with_adapter = without
    if adapter is not None:
        pipe.load_lora_weights(adapter, adapter_name="profile")
        with_adapter = kernel_times(pipe, height, width, args.steps)
    growth, growth_by_kind = _growth(without, with_adapter), _growth(by_kind(without), by_kind(with_adapter))
    result = {
        "preset": args.preset, "cuda_graphs": config.compile.cuda_graphs, "res": [height, width], "rank": args.rank,
        "device": torch.cuda.get_device_name(),
        "ms_per_step_without": sum(ms for ms, _ in without.values()),
        "ms_per_step_with": sum(ms for ms, _ in with_adapter.values()),
        "grown_kernels": [(round(ms, 3), launches, name) for ms, launches, name in growth[:40]],
        # Inductor's kernels without their index (one kernel is numbered differently in the two graphs); all kinds,
        # the shrunk ones too (the adapted projections' cuBLAS GEMMs that the one GEMM replaced)
        "grown_kinds": [(round(ms, 3), launches, kind) for ms, launches, kind in growth_by_kind if ms or launches],
        "top_kernels_without": [(round(ms, 3), launches, name) for name, (ms, launches) in
                                sorted(without.items(), key=lambda item: -item[1][0])[:40]],
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"GPU kernel ms/step: {result['ms_per_step_without']:.1f} without, {result['ms_per_step_with']:.1f} with")
    print("without the adapter, the largest kernels:")
    for ms, launches, name in result["top_kernels_without"][:25]:
        print(f"{ms:8.3f} ms {launches:5d} x  {name}")
    print("with it, the kinds of kernel that grew most (Inductor's without their index), and those that shrank:")
    for ms, launches, kind in result["grown_kinds"][:25] + result["grown_kinds"][25:][-5:]:
        print(f"{ms:+8.3f} ms {launches:+5d} x  {kind}")
    return 0


def _growth(without: dict, with_adapter: dict) -> list[tuple[float, int, str]]:
    """(ms, launches, name) each name grew by with the adapter, largest first."""
    names = set(without) | set(with_adapter)
    return sorted(
        ((with_adapter.get(n, (0, 0))[0] - without.get(n, (0, 0))[0], with_adapter.get(n, (0, 0))[1] -
          without.get(n, (0, 0))[1], n) for n in names), reverse=True,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
