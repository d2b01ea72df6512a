"""`torchrun --nproc-per-node N -m engine.bench --res 2048 --gpus N`: the engine on N GPUs beside the same config on
one GPU, in one run, on the same weights, prompt and seed.

Rank 0 first runs the config alone (the other ranks wait at a barrier), then every rank builds the pipeline again
with `with_parallel(config, N)` and the N-GPU calls are timed (rank 0's clock: the ranks move in lockstep through
the collectives). Peak memory is each rank's own; the row reports the largest. PSNR compares the N-GPU image with
the one-GPU image. Only rank 0 prints and writes results.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import EngineError
from ..measure import environment_info, psnr, relative_error
from .budget import release_cached_memory
from .phases import transformer_step_flops
from .plan import DTYPES, make_plan
from .run import JSON_VERSION, Row, load_components, run_config, with_compile_cache


def one_gpu_label(config) -> str:
    return f"{config.label} (1 GPU)"


def run_parallel(args) -> dict | None:
    """The rows of a --gpus run on rank 0 (None on the other ranks)."""
    from tqdm.auto import tqdm

    from ..engines import FluxEngine
    from ..parallel import init_distributed, with_parallel
    from ..parallel.apply import release_cuda_graphs, synchronize

    world = init_distributed(args.gpus, args.parallel_timeout)
    if world.device.type == "cuda":
        args.device = str(world.device)
    args.no_baseline = True
    plan = make_plan(args)
    if len(plan.configs) != 1:
        raise EngineError(f"--gpus runs one config beside itself on one GPU; got {len(plan.configs)} (--preset A,B)")
    # the one-GPU reference decodes with the VAE tiling the parallel run uses (with_parallel tiles large images so the
    # ranks share the decode), so that the PSNR between the two measures the parallelism alone
    parallel_config = with_parallel(plan.configs[0], args.gpus, chunks=args.cp_chunks, comm_priority=args.cp_priority)
    parallel = parallel_config.parallel
    config = plan.configs[0]
    if config.vae != parallel_config.vae:
        config = replace(config, vae=parallel_config.vae, name=f"{config.name}+{parallel_config.vae.label}")
    if world.is_main:
        print(f"flux-engine {config.label} on {args.gpus} GPUs ({parallel.label}) vs the same on 1 GPU, {plan.model}")
    dtype = DTYPES[args.dtype or ("bf16" if plan.device.type == "cuda" else "fp32")]
    args.dtype = {v: k for k, v in DTYPES.items()}[dtype]
    if args.guidance is None:
        from ..cli import default_guidance

        args.guidance = default_guidance(plan.spec)
    rows, outputs = {}, {}
    calls_per_size = args.runs + args.warmup
    progress = tqdm(total=2 * len(plan.sizes) * calls_per_size, desc="bench", unit="call", file=sys.stderr,
                    disable=not world.is_main)  # fmt: skip
    with progress:
        if world.is_main and not args.no_single:
            components = load_components(plan, args, dtype)
            _fill_defaults(args, components)
            flops = _flops(components, plan.sizes, args)
            engine = FluxEngine.from_pipe(FluxEngine(**components), _cached(config, args, world))
            label = one_gpu_label(config)
            for size in plan.sizes:
                progress.set_postfix_str(f"{label} {size[1]}x{size[0]}")
                rows[(1, size)], outputs[(1, size)] = run_config(engine, label, *size, args, plan.device, flops[size],
                                                                 progress)  # fmt: skip
            del engine, components
            torch._dynamo.reset()
            release_cached_memory(plan.device)
        synchronize(world)  # the other ranks waited here for the one-GPU rows
        components = load_components(plan, args, dtype)
        _fill_defaults(args, components)
        flops = _flops(components, plan.sizes, args)
        parallel_config = _cached(parallel_config, args, world)
        engine = FluxEngine.from_pipe(FluxEngine(**components), parallel_config)
        for size in plan.sizes:
            progress.set_postfix_str(f"{parallel_config.label} {size[1]}x{size[0]}")
            row, output = run_config(engine, parallel_config.label, *size, args, plan.device, flops[size], progress)
            row.peak_allocated_gib = _largest(row.peak_allocated_gib, world)
            row.peak_reserved_gib = _largest(row.peak_reserved_gib, world)
            row.nvml_used_gib = _largest(row.nvml_used_gib, world)
            rows[(args.gpus, size)], outputs[(args.gpus, size)] = row, output
        release_cuda_graphs(weakref.ref(engine))  # before the process group goes (engine.parallel.runtime)
        del engine
    if not world.is_main:
        return None
    ordered = []
    for size in plan.sizes:
        single, row = rows.get((1, size)), rows[(args.gpus, size)]
        if single is not None:
            row.speedup = single.ms_per_step / row.ms_per_step
            row.psnr_db = psnr(outputs[(args.gpus, size)].images, outputs[(1, size)].images)
            row.latent_rel_err = relative_error(outputs[(args.gpus, size)].latents, outputs[(1, size)].latents)
            ordered.append({**asdict(single), "gpus": 1, "time_vs_one_gpu": 1.0})
        ordered.append({**asdict(row), "gpus": args.gpus, "time_vs_one_gpu": _ratio(row, single)})
    return {
        "version": JSON_VERSION,
        "kind": "engine.bench",
        "env": {**environment_info(plan.device), "gpus": args.gpus, "backend": world.backend},
        "model": plan.model,
        "dtype": args.dtype,
        "preset": config.label,
        "presets": [config.label],
        "headline": f"{config.label} on {args.gpus} GPUs ({parallel.label}) vs 1 GPU",
        "baseline": one_gpu_label(config),
        "engine_config": replace(parallel_config, cache=config.cache).label,
        "parallel": {"ulysses": parallel.ulysses, "ring": parallel.ring, "gpus": args.gpus},
        "prompt": args.prompt,
        "guidance": args.guidance,
        "max_sequence_length": args.max_sequence_length,
        "seed": args.seed,
        "timing": "cuda events, rank 0" if plan.device.type == "cuda" else "perf_counter (CPU), rank 0",
        "rows": ordered,
    }


def _fill_defaults(args, components) -> None:
    if args.max_sequence_length is None:
        args.max_sequence_length = min(512, components["tokenizer_2"].model_max_length)


def _flops(components, sizes, args) -> dict:
    config = dict(components["transformer"].config)
    return {size: transformer_step_flops(config, *size, args.max_sequence_length, args.batch) for size in sizes}


def _cached(config, args, world):
    """A compile cache per rank (the ranks compile the same graphs at the same time: one folder would have them
    write the same files at once)."""
    if config.compile.mode == "none":
        return config
    with contextlib.redirect_stdout(sys.stdout if world.is_main else None):
        cached = with_compile_cache(config, args)
    directory = Path(cached.cache.directory) / f"rank{world.rank}"
    return replace(cached, cache=replace(cached.cache, directory=str(directory)))


def _largest(value: float | None, world) -> float | None:
    """The largest of every rank's `value` (peak memory per GPU: the row reports the fullest GPU)."""
    values = [None] * world.size
    dist.all_gather_object(values, value)
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _ratio(row: Row, single: Row | None) -> float | None:
    if single is None or not single.total_s:
        return None
    return row.total_s / single.total_s


def gpus_verdicts(result: dict) -> list[str]:
    """One line per size: the N-GPU time per image and per step against one GPU, peak memory per GPU, PSNR."""
    lines = []
    singles = {(r["height"], r["width"]): r for r in result["rows"] if r.get("gpus") == 1}
    for row in result["rows"]:
        single = singles.get((row["height"], row["width"]))
        if row.get("gpus", 1) == 1 or single is None:
            continue
        lines.append(
            f"{row['config']} on {row['gpus']} GPUs vs 1, {row['width']}x{row['height']}, {row['steps']} steps: "
            f"{row['total_s']:.2f} vs {single['total_s']:.2f} s per image ({row['time_vs_one_gpu']:.2f}x the time), "
            f"{row['ms_per_step']:.0f} vs {single['ms_per_step']:.0f} ms per step ({row['speedup']:.2f}x), peak "
            f"{_gib(row['peak_allocated_gib'])} vs {_gib(single['peak_allocated_gib'])} GiB per GPU, PSNR "
            f"{row['psnr_db']:.1f} dB against 1 GPU"
        )
    return lines


def _gib(value) -> str:
    return "-" if value is None else f"{value:.1f}"
