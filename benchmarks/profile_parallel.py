"""Where a context-parallel step's time goes, beside the same step on one GPU: GPU kernel time per category
(GEMMs, attention, NCCL, copies and layout changes, the rest), from torch.profiler, on rank 0.

    torchrun --nproc-per-node 2 -m benchmarks.profile_parallel --res 2048 --out results/profile.json

Eager regional compile (no CUDA graphs), so that every kernel is its own event; 2 steps profiled after a warm-up.

    torchrun --nproc-per-node 2 -m benchmarks.profile_parallel --timeline --preset fp8-compile-fastacc-cudagraphs \
        --res 2048 --out results/timeline.json [--trace-dir DIR]

--timeline: instead, each rank's timeline of one call of the given preset (CUDA graphs too: the kernels a replay runs
are traced): per step, the span, compute time, communication time, the communication with no compute beside it, and
idle time (benchmarks.profiling.timeline), every rank beside one GPU; --trace-dir writes each rank's Chrome trace.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.profiling import kernel_intervals, kernel_times, timeline
from engine import FluxEngine, preset
from engine.parallel import init_distributed, with_parallel
from engine.resolution import parse_resolution

CATEGORIES = (
    ("nccl", ("nccl",)),
    ("attention", ("flash", "attention", "fmha", "cudnn", "sdpa")),
    ("gemm", ("gemm", "sm90", "cutlass", "xmma", "scaled_mm", "matmul")),
    ("copy", ("copy", "elementwise_kernel_with_index", "direct_copy", "cat", "permute", "transpose", "memcpy")),
)


def category(name: str) -> str:
    lowered = name.lower()
    for label, keys in CATEGORIES:
        if any(key in lowered for key in keys):
            return label
    return "other"


def profile(pipe, height: int, width: int, steps: int) -> dict:
    per_category: dict[str, float] = defaultdict(float)
    kernels = []
    for name, (ms, count) in kernel_times(pipe, height, width, steps).items():
        per_category[category(name)] += ms
        kernels.append((ms, count, name[:90]))
    kernels.sort(reverse=True)
    return {"ms_per_step_by_category": dict(per_category), "top_kernels": kernels[:30]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--res", default="2048")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--preset", default="fp8-compile-fastacc")
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeline", action="store_true", help="each rank's compute / communication / idle per step")
    parser.add_argument("--trace-dir", default=None, help="--timeline: write each rank's Chrome trace here")
    args = parser.parse_args()
    if args.timeline:
        from engine.cli import end_parallel_run

        return end_parallel_run(main_timeline(args))  # the CUDA graphs' NCCL resources released before teardown
    height, width = parse_resolution(args.res)
    result, parallel, world = _one_gpu_then_parallel(args, lambda pipe, _: profile(pipe, height, width, args.steps))
    result["parallel"] = parallel
    if world.is_main:
        Path(args.out).write_text(json.dumps(result, indent=1))
        for name in ("one_gpu", "parallel"):
            cats = result[name]["ms_per_step_by_category"]
            print(name, {k: round(v, 1) for k, v in sorted(cats.items())}, "total", round(sum(cats.values()), 1))
        for ms, count, key in result["parallel"]["top_kernels"][:20]:
            print(f"{ms:8.2f} ms/step {count:5d}x {key}")
    return 0


def _one_gpu_then_parallel(args, measure):
    """measure(pipe, name) of args.preset on one GPU (rank 0, the other ranks waiting), then of it split over every
    rank -> (result with the one-GPU measure, this rank's parallel measure, the World)."""
    height, width = parse_resolution(args.res)
    gpus = int(os.environ.get("WORLD_SIZE", "1"))
    world = init_distributed(gpus)
    config = with_parallel(preset(args.preset), gpus)
    result = {"preset": config.label, "size": f"{width}x{height}", "gpus": gpus, "steps": args.steps}
    if world.is_main:
        single = FluxEngine.from_pretrained("synthetic:flux-dev", config=preset(args.preset), device=world.device)
        single.set_progress_bar_config(disable=True)
        result["one_gpu"] = measure(single, "one-gpu")
        del single
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    dist.barrier()
    pipe = FluxEngine.from_pretrained("synthetic:flux-dev", config=config, device=world.device)
    pipe.set_progress_bar_config(disable=True)
    return result, measure(pipe, f"rank{world.rank}"), world


def main_timeline(args) -> int:
    """Each rank's timeline of one call of args.preset (per step, ms), beside one GPU's; rank 0 writes them all."""
    height, width = parse_resolution(args.res)

    def measure(pipe, name: str) -> dict:
        trace = None
        if args.trace_dir is not None:
            Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
            trace = str(Path(args.trace_dir) / f"{name}.json")
        return timeline(kernel_intervals(pipe, height, width, args.steps, trace), args.steps)

    result, mine, world = _one_gpu_then_parallel(args, measure)
    ranks = [None] * world.size
    dist.all_gather_object(ranks, mine)
    result["ranks"] = ranks
    if world.is_main:
        Path(args.out).write_text(json.dumps(result, indent=1))
        for name, row in [("one GPU", result["one_gpu"])] + [(f"rank {r}", row) for r, row in enumerate(ranks)]:
            print(f"{name:8s}", "  ".join(f"{key} {value:7.1f}" for key, value in row.items()), "ms/step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
