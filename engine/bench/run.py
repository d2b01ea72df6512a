"""engine.bench's measurement: the models and configs of a run, each call's phases timed, a row per config and size."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..cli import default_guidance
from ..measure import (
    PeakMemory,
    environment_info,
    median,
    psnr,
    quantiles,
    relative_error,
    synchronize,
    track_peak_memory,
)
from ..stepcache import with_step_cache
from ..tasks import TASKS, components_for, condition_tokens, synthetic_inputs
from .budget import Job, budget_jobs, emulated_budget, release_cached_memory
from .lora import attach, measure_swap, note_lora, prepare_lora
from .phases import CallTimes, Interval, record_phases, transformer_step_flops
from .plan import DTYPES, Plan, make_plan
from .report import BASELINE_LABEL
from .step_cache import enable_diffusers_cache, note_cache, prepare_cache

JSON_VERSION = 1

# ----------------------------------------------------------------------------- one configuration


@dataclass
class Row:
    config: str
    height: int
    width: int
    steps: int
    batch: int
    runs: int
    ms_per_step: float
    ms_per_step_p20: float
    ms_per_step_p80: float
    tflop_per_step: float
    tflops: float | None  # None with a step cache (a skipped step's time is no rate)
    encode_s: float
    denoise_s: float
    decode_s: float
    total_s: float
    peak_allocated_gib: float | None
    peak_reserved_gib: float | None
    nvml_used_gib: float | None
    first_call_s: float | None = None  # the first warm-up call: includes compiling, autotuning
    graphs_compiled: int = 0  # graphs torch.compile made during this row's calls (0: no recompile)
    compile_cold_s: float | None = None  # first call minus a timed call, on an empty compile cache
    compile_warm_s: float | None = None  # the same after torch._dynamo.reset(), from the on-disk cache
    speedup: float | None = None
    psnr_db: float | None = None
    latent_rel_err: float | None = None
    peak_encode_gib: float | None = None  # peak allocated inside each phase
    peak_denoise_gib: float | None = None
    peak_decode_gib: float | None = None
    budget_gib: float | None = None  # --vram: the emulated card size, and the planner's prediction
    predicted_peak_gib: float | None = None
    offload: dict | None = None  # streamed bytes per step, the copy time they take at the measured bandwidth
    engine_config: str | None = None  # --vram: what the plan turned on (the row's config is the plan's name)
    error: str | None = None  # the call failed (out of memory under --vram): what the engine said
    lora: str | None = None  # --lora: the adapter active in this row's calls
    lora_swap_s: float | None = None  # --lora: a hot-swap of it, to ready (the first size's row of each config)
    lora_swap_recompiles: int | None = None  # graphs compiled by the swap and the call after it (target: 0)
    lora_swap_captures: int | None = None  # CUDA graphs captured again by them (target: 0)
    lora_off_ms_per_step: float | None = None  # --lora: the same config before the adapter was loaded, same process
    lora_off_peak_gib: float | None = None
    step_cache: dict | None = None  # --cache: full / skipped steps, against the uncached config (bench/step_cache)


def compiled_graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure_warm_compile(pipe, row: Row, args, device: torch.device, progress) -> None:
    """Drop every compiled graph (torch._dynamo.reset, and the regions' frames: engine.frames) and time one call: the
    warm start from the cache."""
    from ..compile import reload_frames
    from ..cuda_graphs import drop_captured_graphs

    torch._dynamo.reset()
    reload_frames(getattr(pipe, "compile_state", None))
    drop_captured_graphs(pipe)  # or the replay would skip the compile (and a capture would compile)
    warm_args = argparse.Namespace(**{**vars(args), "warmup": 1, "runs": 1})
    warm, _ = run_config(pipe, row.config, row.height, row.width, warm_args, device, 0, progress)
    row.compile_warm_s = max(0.0, warm.first_call_s - warm_call_seconds(row, args.warmup_steps))


def warm_call_seconds(row: Row, steps: int) -> float:
    """What a call of `steps` denoising steps takes once compiled: the timed calls' own time when they ran as many
    steps, else their encode and decode plus `steps` median steps."""
    if steps == row.steps:
        return row.total_s
    return row.encode_s + row.decode_s + steps * row.ms_per_step / 1e3


@dataclass
class Output:
    images: torch.Tensor
    latents: torch.Tensor


def run_config(
    pipe, label: str, height: int, width: int, args, device: torch.device, flops: int, progress
) -> tuple[Row, Output]:
    """Warm up, then time `args.runs` calls; returns the row and the last call's images and latents."""
    captured = {}

    def keep_latents(pipeline, step, timestep, tensors):
        captured["latents"] = tensors["latents"]
        return tensors

    inputs = synthetic_inputs(args.task, height, width, args.seed)  # the task's picture, mask, control image

    def call(steps: int = args.steps):
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        output = pipe(
            prompt=[args.prompt] * args.batch,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=args.guidance,
            generator=generator,
            max_sequence_length=args.max_sequence_length,
            output_type="pt",
            callback_on_step_end=keep_latents,
            **inputs,
        )
        return None if output is None else output.images  # None: a context-parallel rank other than 0

    pipe.set_progress_bar_config(disable=True)
    release_cached_memory(device)
    graphs_before = compiled_graph_count()
    first_call_s = None
    for _ in range(args.warmup):
        first = Interval(device)
        first.start()
        call(args.warmup_steps)
        first.stop()
        synchronize(device)
        first_call_s = first.ms() / 1e3 if first_call_s is None else first_call_s
        progress.update(1)
    calls: list[CallTimes] = []
    peaks: list[PeakMemory] = []
    for _ in range(args.runs):
        with track_peak_memory(device) as peak, record_phases(pipe, device) as times:
            images = call()
        calls.append(times)
        peaks.append(peak)
        progress.update(1)
    step_ms = [ms for c in calls for ms in c.step_ms]
    step_q = quantiles(step_ms)
    tflop = flops / 1e12

    def peak_of(name: str) -> float | None:
        values = [getattr(p, name) for p in peaks if getattr(p, name) is not None]
        if name == "allocated_gib":  # the phases reset the counter: the call's peak is the largest of theirs
            values += [v for c in calls for v in c.peak_gib.values()]
        return max(values) if values else None

    def phase_peak(phase: str) -> float | None:
        values = [c.peak_gib[phase] for c in calls if phase in c.peak_gib]
        return max(values) if values else None

    row = Row(
        config=label,
        height=height,
        width=width,
        steps=args.steps,
        batch=args.batch,
        runs=args.runs,
        ms_per_step=step_q["median"],
        ms_per_step_p20=step_q["p20"],
        ms_per_step_p80=step_q["p80"],
        tflop_per_step=tflop,
        tflops=tflop / (step_q["median"] / 1e3) if step_q["median"] > 0 else float("nan"),
        encode_s=median([sum(c.encode_ms) for c in calls]) / 1e3,
        denoise_s=median([sum(c.step_ms) for c in calls]) / 1e3,
        decode_s=median([sum(c.decode_ms) for c in calls]) / 1e3,
        total_s=median([c.total_ms for c in calls]) / 1e3,
        peak_allocated_gib=peak_of("allocated_gib"),
        peak_reserved_gib=peak_of("reserved_gib"),
        nvml_used_gib=peak_of("nvml_used_gib"),
        first_call_s=first_call_s,
        graphs_compiled=compiled_graph_count() - graphs_before,
        peak_encode_gib=phase_peak("encode"),
        peak_denoise_gib=phase_peak("denoise"),
        peak_decode_gib=phase_peak("decode"),
    )
    images = None if images is None else images.float().cpu()
    return row, Output(images=images, latents=captured["latents"].float().cpu())


def compare(row: Row, output: Output, baseline_row: Row, baseline: Output) -> None:
    row.speedup = baseline_row.ms_per_step / row.ms_per_step
    row.psnr_db = psnr(output.images, baseline.images)
    row.latent_rel_err = relative_error(output.latents, baseline.latents)


def load_components(plan: Plan, args, dtype: torch.dtype) -> dict:
    from ..models import is_variant_name, load_local_components, synthetic_components

    if is_variant_name(plan.model):
        components = synthetic_components(plan.model, device=plan.device, dtype=dtype, seed=args.seed)
    else:
        folder = args.config_folder
        components = load_local_components(plan.model, device=plan.device, dtype=dtype, config_folder=folder)
    if args.task == "controlnet":  # diffusers' pipeline and the engine share it, as they share the transformer
        from ..models.controlnet import load_controlnet

        components["controlnet"] = load_controlnet(args.controlnet, plan.device, dtype, args.seed)
    return components


def with_compile_cache(config, args):
    """The bench measures a cold compile: unless --cache-dir names one, compile into a fresh, empty cache
    (inductor, Triton and the engine's artefacts), which the warm measurement then reuses. A cold compile is cold:
    compile artefacts shipped with the package are not looked for then ($FLUX_ENGINE_SHIPPED_ARTIFACTS, unless set,
    names an empty place; benchmarks/startup.py's `shipped` start measures them)."""
    from ..compile import SHIPPED_ARTIFACTS_ENV
    from ..config import CacheConfig

    directory = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="flux-engine-cache-"))
    print(f"compile cache: {directory}" + ("" if args.cache_dir else " (fresh: the first compile is cold)"))
    if not args.cache_dir:
        os.environ.setdefault(SHIPPED_ARTIFACTS_ENV, str(directory / "none-shipped"))
    return replace(config, cache=CacheConfig(directory=str(directory)))


def quantization_summary(engine, label: str) -> dict:
    """Per quantised component: mode, weight GiB and per-layer SQNR (dB) against the unquantised weights."""
    from ..quant.report import quantization_report

    report = quantization_report(engine)
    for component, info in report.items():
        sqnr = info.get("sqnr") or {}
        print(
            f"{label}: {component} {info['mode']}, {info['weight_gib']:.2f} GiB of weights, "
            f"{info['quantized_layers']} layers quantised; per-layer SQNR min {sqnr.get('min_db', '-')} dB, "
            f"median {sqnr.get('median_db', '-')} dB"
        )
    return report


def run_job(engine, label: str, size: tuple, args, device: torch.device, flops: int, progress):
    """run_config, with an out-of-memory failure recorded as a row (the engine has freed what it held)."""
    from ..errors import EngineOutOfMemoryError

    try:
        return run_config(engine, label, *size, args, device, flops, progress)
    except EngineOutOfMemoryError as err:
        return failed_row(label, size, args, flops, str(err)), None
    except Exception as err:  # one broken config must not lose the rows of the others: recorded, reported
        import traceback

        traceback.print_exc()
        return failed_row(label, size, args, flops, f"{type(err).__name__}: {err}"), None


def failed_row(label: str, size: tuple, args, flops: int, error: str) -> Row:
    print(f"\n{label} at {size[1]}x{size[0]} failed: {error}", file=sys.stderr)
    nan = float("nan")
    row = Row(label, *size, args.steps, args.batch, 0, nan, nan, nan, flops / 1e12, nan, nan, nan, nan, nan,
              None, None, None)  # fmt: skip
    row.error = error
    return row


def offload_figures(engine, row: Row, h2d: dict | None) -> dict | None:
    """Bytes the streaming policy moved per denoising step, and the copy time that takes at the measured
    pinned bandwidth: against the step time, how much of the copying the prefetch hides."""
    state = getattr(engine, "offload_state", None)
    if state is None:
        return None
    summary = state.summary()
    streamed = state.streamers.get("transformer")
    if streamed is not None and streamed.units:
        per_step = sum(unit.nbytes for unit in streamed.units)
        summary["bytes_per_step"] = per_step
        if h2d:
            copy_ms = per_step / (h2d["pinned_GBps"] * 1e9) * 1e3
            summary["copy_ms_per_step"] = round(copy_ms, 2)
            summary["copy_share_of_step"] = round(copy_ms / row.ms_per_step, 3) if row.ms_per_step else None
    return summary


def _free(device: torch.device) -> None:
    torch._dynamo.reset()
    release_cached_memory(device)


def run(args, plan: Plan | None = None) -> dict:
    import diffusers
    from tqdm.auto import tqdm

    from ..engines import ENGINES

    plan = plan or make_plan(args)
    if plan.headline:
        print(plan.headline, flush=True)
    if plan.note:
        print(plan.note, flush=True)
    if args.dtype is None:
        args.dtype = "bf16" if plan.device.type == "cuda" else "fp32"
    dtype = DTYPES[args.dtype]
    components = load_components(plan, args, dtype)
    lora = prepare_lora(args.lora, components, args.seed) if args.lora else None
    cache = prepare_cache(getattr(args, "cache", None))
    if args.max_sequence_length is None:
        args.max_sequence_length = min(512, components["tokenizer_2"].model_max_length)
    if args.guidance is None:
        args.guidance = default_guidance(plan.spec)
    env = environment_info(plan.device)
    transformer_config = dict(components["transformer"].config)
    flops = {
        size: transformer_step_flops(
            transformer_config, *size, args.max_sequence_length, args.batch, condition_tokens(args.task, *size)
        )
        for size in plan.sizes
    }
    engine_configs = [with_step_cache(c, cache) for c in plan.configs] if cache is not None else plan.configs
    jobs = [Job(config, plan.sizes) for config in engine_configs] + budget_jobs(plan, args)
    configs = list(dict.fromkeys(([] if args.no_baseline else [BASELINE_LABEL]) + [j.config.label for j in jobs]))
    total_calls = sum(len(j.sizes) for j in jobs) * (args.runs + args.warmup)
    total_calls += (0 if args.no_baseline else len(plan.sizes)) * (args.runs + args.warmup)
    total_calls += 2 * sum(j.config.compile.mode != "none" and j.budget_gib is None for j in jobs)  # warm probes
    total_calls *= 2 if lora is not None or cache is not None else 1  # each config without the adapter / cache first
    h2d = None
    if plan.device.type == "cuda" and any(j.config.offload.policy != "none" for j in jobs):
        from ..offload import measure_h2d_bandwidth

        h2d = measure_h2d_bandwidth(plan.device)
        print(f"host->device copy: {h2d['pinned_GBps']} GB/s pinned, {h2d['pageable_GBps']} GB/s pageable")
    rows: dict[tuple, Row] = {}
    outputs: dict[tuple, Output] = {}
    attention_cores: dict[str, str] = {}
    quant_reports: dict[str, dict] = {}
    with tqdm(total=total_calls, desc="bench", unit="call", file=sys.stderr) as progress:
        if not args.no_baseline:
            baseline_class = getattr(diffusers, TASKS[args.task].pipeline_class)
            baseline_pipe = baseline_class(**components_for(baseline_class, components))
            if lora is not None:
                attach(baseline_pipe, lora)
            baseline_cache = enable_diffusers_cache(baseline_pipe, cache) if cache is not None else None
            for size in plan.sizes:
                progress.set_postfix_str(f"{BASELINE_LABEL} {size[1]}x{size[0]}")
                key = (BASELINE_LABEL, size)
                rows[key], outputs[key] = run_config(
                    baseline_pipe, BASELINE_LABEL, *size, args, plan.device, flops[size], progress
                )
                rows[key].lora = lora.label if lora is not None else None  # diffusers ran with the same adapter
            if baseline_cache is not None:  # its hooks sit on the transformer the first engine config shares
                baseline_pipe.transformer.disable_cache()
            del baseline_pipe
        for index, job in enumerate(jobs):
            if index > 0 or lora is not None:  # weights are rewritten in place (optimisations, an adapter): fresh ones
                # the last config's components dropped before the collection: held here until the new ones were
                # loaded, its transformer (in reference cycles, as diffusers' own are after a call) outlived the
                # collection and was counted in the next config's peaks (an fp8 transformer's 11 GiB, at times)
                components = None
                _free(plan.device)
                components = load_components(plan, args, dtype)
            engine_config = job.config
            if engine_config.compile.mode != "none":
                engine_config = with_compile_cache(engine_config, args)
            label = engine_config.label
            try:
                engine_class = ENGINES[args.task]
                engine = engine_class(**components_for(engine_class, components))
                engine.model_name = plan.model
                engine = engine_class.from_pipe(engine, engine_config)
                # with --lora, the config without the adapter first: the adapter's cost in one process
                lora_off = {size: run_job(engine, label, size, args, plan.device, flops[size], progress)[0]
                            for size in (job.sizes if lora is not None else ())}  # fmt: skip
                cache_off = {}  # with --cache, the same config with the cache paused first: its reference
                if cache is not None:
                    with engine.step_cache_state.paused():
                        cache_off = {size: run_job(engine, label, size, args, plan.device, flops[size], progress)
                                     for size in job.sizes}  # fmt: skip
                if lora is not None:
                    attach(engine, lora)
            except Exception as err:  # e.g. out of memory while quantising: record it, go on with the next config
                for size in job.sizes:
                    rows[(label, size)] = failed_row(label, size, args, flops[size], f"{type(err).__name__}: {err}")
                    outputs[(label, size)] = None
                engine = None
                continue
            attention_cores[label] = engine.attention_ops.core if engine.attention_ops is not None else "diffusers"
            if getattr(engine, "quant_state", None) is not None:
                quant_reports[label] = quantization_summary(engine, label)
            for size in job.sizes:
                progress.set_postfix_str(f"{label} {size[1]}x{size[0]}")
                key = (label, size)
                with emulated_budget(job.budget_gib, plan.device):
                    rows[key], outputs[key] = run_job(engine, label, size, args, plan.device, flops[size], progress)
                row = rows[key]
                row.budget_gib, row.predicted_peak_gib = job.budget_gib, job.predicted_peak_gib
                if job.budget_gib is not None:
                    row.engine_config = replace(job.config, name="").label
                row.offload = offload_figures(engine, row, h2d)
                note_lora(row, lora, lora_off.get(size))
                if not args.no_baseline and outputs[key] is not None:
                    compare(row, outputs[key], rows[(BASELINE_LABEL, size)], outputs[(BASELINE_LABEL, size)])
                if cache is not None and outputs[key] is not None:
                    note_cache(row, engine, *cache_off.get(size, (None, None)), outputs[key],
                               rows.get((BASELINE_LABEL, size)))  # fmt: skip
            # the warm-compile probe once per compiled preset (a --vram plan reuses the graphs of the presets)
            # (only after a warm-up call: its time, less a timed call's, is the cold compile)
            if lora is not None and outputs[(label, job.sizes[0])] is not None:
                measure_swap(engine, lora, rows[(label, job.sizes[0])], args, plan.device, compiled_graph_count)
            warm_probe = job.budget_gib is None and engine.compile_state is not None and args.warmup > 0
            if warm_probe and outputs[(label, job.sizes[0])] is not None:
                first = rows[(label, job.sizes[0])]
                first.compile_cold_s = max(0.0, first.first_call_s - warm_call_seconds(first, args.warmup_steps))
                progress.set_postfix_str(f"{label} warm compile")
                measure_warm_compile(engine, first, args, plan.device, progress)
            del engine
    if cache is not None:  # a median step of a cached call is a skipped one's: no rate of the model's FLOPs
        for row in rows.values():
            row.tflops = None
    ordered = [asdict(rows[(label, size)]) for size in plan.sizes for label in configs if (label, size) in rows]
    return {
        "version": JSON_VERSION,
        "kind": "engine.bench",
        "env": env,
        "model": plan.model,
        "task": args.task,
        "dtype": args.dtype,
        "preset": ",".join(c.label for c in engine_configs),
        "presets": [c.label for c in engine_configs],
        "headline": plan.headline,
        "engine_config": ",".join(c.label for c in engine_configs),
        "prompt": args.prompt,
        "guidance": args.guidance,
        "max_sequence_length": args.max_sequence_length,
        "seed": args.seed,
        "timing": "cuda events" if plan.device.type == "cuda" else "perf_counter (CPU)",
        "attention_core": attention_cores,
        "quantization": quant_reports,
        "h2d": h2d,
        "lora": lora.label if lora is not None else None,
        "step_cache": cache.label if cache is not None else None,
        "baseline_cache": baseline_cache if cache is not None and not args.no_baseline else None,
        "plans": [j.explanation for j in jobs if j.explanation],
        "rows": ordered,
    }
