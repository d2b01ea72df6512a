"""What a bench run will do, decided before anything heavy is built: device, model, sizes, the configs (the fastest
for this machine when no --preset is given), where the results go; and the checks that refuse a run that cannot
work."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cli import choose_model
from ..config import resolve_config
from ..errors import EngineError
from ..files import check_writable
from ..tasks import TASKS
from .arguments import check_arguments, parse_budgets, parse_presets
from .report import default_out_dir

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Plan:
    device: torch.device
    model: str
    sizes: list[tuple[int, int]]
    spec: object
    note: str | None
    configs: list = field(default_factory=list)  # the EngineConfigs to run beside the baseline
    out: Path | None = None  # where the JSON goes (checked writable before any work)
    headline: str | None = None  # the default run's first line: what is compared with what, and why


def check_baseline_is_diffusers(model: str) -> None:
    """The baseline is diffusers on the checkpoint's own weights: a folder written by save_quantized holds an fp8
    transformer that every pipeline over it runs quantised, so its "diffusers" would not be diffusers at all."""
    from ..quant.checkpoint import saved_quantization

    info = saved_quantization(model) if Path(model).is_dir() else None
    if info is not None:
        raise EngineError(
            f"--model {model!r} holds a transformer saved quantised as {info['mode']!r} (engine.quant.save_quantized): "
            "a diffusers baseline over it would run those fp8 weights, not diffusers' bf16 ones. Pass the bf16 folder "
            "it was saved from for a comparison, or --no-baseline to time the presets alone"
        )


def make_plan(args) -> Plan:
    """Validate every argument, and check that the results can be written, before anything heavy is built."""
    check_arguments(args)
    args.budgets = parse_budgets(args.vram)
    if args.preset is not None or args.budgets:
        presets = parse_presets(args.preset or "", allow_none=bool(args.budgets))
    choice = choose_model(args, args.res)
    on_cpu = choice.device.type != "cuda"
    if args.runs is None:
        args.runs = 1 if on_cpu else 3
    if args.warmup_steps is None:  # a static step cache names steps of the full call: its warm-up runs them all
        static_cache = (getattr(args, "cache", None) or "").startswith("static")
        args.warmup_steps = 1 if on_cpu and not static_cache else args.steps
    out = Path(args.out) if args.out else None
    check_writable(out or default_out_dir(choice.device.type == "cuda") / "bench.json", "--out")
    for path in (args.save_baseline,) if args.save_baseline else ():
        check_writable(Path(path), "--save-baseline")
    note = None
    if choice.defaulted_to_tiny:
        note = "no CUDA GPU: benchmarking the tiny synthetic model on the CPU (timings say nothing about a GPU)"
    plan = Plan(choice.device, choice.model, choice.sizes, choice.spec, note, out=out)
    if not args.no_baseline:
        check_baseline_is_diffusers(plan.model)
    if not args.no_baseline and plan.device.type == "cuda":
        check_baseline_fits(plan, args, card_gib(plan.device))
    if args.preset is None and not args.budgets:
        fastest = fastest_for(plan, args)
        plan.configs = [fastest.config]
        plan.headline = headline(plan, fastest, args)
    else:
        check_presets_runnable(presets, choice.device)
        plan.configs = [resolve_config(name) for name in presets]
    return plan


def card_gib(device: torch.device) -> float:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).total_memory / 2**30


def check_baseline_fits(plan: Plan, args, card: float) -> None:
    """The diffusers baseline keeps every component on the GPU: on a card of `card` GiB too small for it, say so
    before building anything (an out-of-memory traceback minutes later helps nobody)."""
    if plan.spec is None or args.dtype == "fp32":
        return
    from ..config import PRESETS
    from ..memory.planner import RESERVE_GIB, predict

    for height, width in plan.sizes:
        task = getattr(args, "task", "text-to-image")
        need = predict(PRESETS["baseline"], plan.spec.name, height, width, args.batch, args.steps, task=task).peak_gib
        if need + RESERVE_GIB > card:
            raise EngineError(
                f"the diffusers baseline needs ~{need + RESERVE_GIB:.0f} GiB at {width}x{height} (predicted), more "
                f"than this GPU's {card:.0f} GiB, and the bench builds every component on the GPU in "
                f"{args.dtype or 'bf16'} before the engine quantises or offloads it; run it on a larger GPU, or check "
                "the mechanics with "
                "--model synthetic:tiny"
            )


def fastest_for(plan: Plan, args):
    """The planner's fastest config for this machine at the sizes asked for (engine.memory.planner.fastest_config)."""
    from flux_kernels import triton_runnable

    from ..memory.planner import fastest_config
    from ..quant.fp8 import fp8_compute_for

    cuda = plan.device.type == "cuda"
    return fastest_config(
        plan.device.type, plan.sizes, variant=plan.spec.name if plan.spec is not None else "flux-dev",
        card_gib=card_gib(plan.device) if cuda else None,
        fp8_hardware=cuda and fp8_compute_for(plan.device) == "scaled_mm",
        triton=triton_runnable(plan.device), batch=args.batch, steps=args.steps,
        task=getattr(args, "task", "text-to-image"),
    )  # fmt: skip


def headline(plan: Plan, fastest, args) -> str:
    sizes = ", ".join(f"{w}x{h}" for h, w in plan.sizes)
    runs = f"{args.runs} run" + ("s" if args.runs > 1 else "")
    task = getattr(args, "task", "text-to-image")
    pipeline = TASKS[task].pipeline_class
    versus = "alone (--no-baseline)" if args.no_baseline else f"vs diffusers {pipeline}"
    if task != "text-to-image":
        versus = f"({task}) {versus}"
    return (
        f"flux-engine {fastest.config.label} {versus}, {plan.model} at {sizes}, {args.steps} steps x {runs}: "
        f"{fastest.reason} (other presets: --preset NAME; see --help)"
    )


def check_presets_runnable(presets: list[str], device: torch.device) -> None:
    from flux_kernels import triton_runnable

    triton_presets = [name for name in presets if resolve_config(name).attention.needs_triton]
    if triton_presets and not triton_runnable(device):
        raise EngineError(
            f"preset(s) {', '.join(triton_presets)} run our Triton kernels, which need a CUDA GPU; on "
            f"{device.type} use baseline or compile"
        )
