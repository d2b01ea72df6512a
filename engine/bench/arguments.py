"""engine.bench's argument checks that need no model and no torch, shared by the command line (before the heavy
imports) and the run (engine.bench.run.make_plan)."""

from __future__ import annotations

from pathlib import Path

from ..cli import check_launched
from ..config import resolve_config
from ..errors import EngineError


def check_positive(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise EngineError(f"--{name} {value} must be at least {minimum}")


def parse_budgets(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        budgets = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise EngineError(f"--vram {text!r} is not a list of GiB figures; write e.g. 12 or 6,8,12,24") from err
    for budget in budgets:
        if not 0 < budget <= 1024:
            raise EngineError(f"--vram {budget:g} GiB is outside 0..1024; give the card's memory in GiB, e.g. 12")
    return budgets


def parse_presets(text: str, allow_none: bool = False) -> list[str]:
    """'kernels' / 'baseline,kernels,compile' / 'ladder' (every preset, in the order PRESETS lists them)."""
    from ..config import PRESETS

    names = list(PRESETS) if text.strip() == "ladder" else [n.strip() for n in text.split(",") if n.strip()]
    if not names and allow_none:
        return []
    if not names:
        raise EngineError("--preset is empty; name a preset, several separated by commas, or 'ladder'")
    for name in names:
        resolve_config(name)
    if len(set(names)) != len(names):
        raise EngineError(f"--preset {text!r} names a preset twice")
    return names


def check_arguments(args) -> None:
    """The checks that need no model and no torch, so that a typo is answered at once."""
    from ..resolution import parse_resolution, validate_resolution, validate_steps

    parse_budgets(args.vram)
    validate_steps(args.steps)
    for name in ("runs", "warmup_steps"):
        if getattr(args, name) is not None:
            check_positive(name.replace("_", "-"), getattr(args, name))
    check_positive("warmup", args.warmup, 0)
    check_positive("batch", args.batch)
    length = getattr(args, "max_sequence_length", None)
    if length is not None and not 1 <= length <= 512:
        raise EngineError(
            f"--max-sequence-length {length} is outside 1..512 (T5 tokens: FLUX.1-dev takes up to 512, schnell 256); "
            "leave it out for the model's own"
        )
    check_gpus(args)
    check_lora_argument(getattr(args, "lora", None))
    check_cache_argument(args)
    if args.preset is not None:
        parse_presets(args.preset, allow_none=bool(args.vram))
    sizes = [parse_resolution(text) for text in args.res]
    for size in sizes:
        # the multiple of 16 here; the model's own size range once it is known (engine.cli.choose_model)
        validate_resolution(*size, allow_any_size=True)
    if len(set(sizes)) != len(sizes):
        raise EngineError(f"--res {' '.join(args.res)} names a size twice (its rows and verdicts would repeat)")


def check_gpus(args) -> None:
    """--gpus N runs under torchrun with N processes, one config, no gate or budgets (those compare one GPU's
    rows)."""
    gpus = getattr(args, "gpus", 1)
    check_launched(gpus, "engine.bench")
    if gpus == 1:
        return
    timeout = getattr(args, "parallel_timeout", 1800.0)
    if not 0 < timeout < float("inf"):
        raise EngineError(f"--parallel-timeout {timeout} must be a number of seconds > 0 (default 1800)")
    task = getattr(args, "task", "text-to-image")
    if task != "text-to-image":
        raise EngineError(f"--gpus {gpus} runs --task text-to-image only; run --task {task} on one GPU")
    if getattr(args, "lora", None):
        raise EngineError(f"--lora is not run with --gpus yet (the adapter would be left out); run --gpus {gpus} alone")
    for flag, value in (("--gate", args.gate), ("--vram", args.vram), ("--save-baseline", args.save_baseline)):
        if value:
            raise EngineError(f"{flag} compares one-GPU runs; leave it out with --gpus {gpus}")
    if args.preset is not None and ("," in args.preset or args.preset == "ladder"):
        raise EngineError(f"--gpus runs one preset beside itself on one GPU; --preset {args.preset!r} names several")


SYNTHETIC_LORA = "synthetic:"


def check_lora_argument(text: str | None) -> None:
    """--lora's form, before anything is built: a local file, or synthetic:RANK with RANK >= 1."""
    if text is None:
        return
    if text.startswith(SYNTHETIC_LORA):
        rank = text[len(SYNTHETIC_LORA) :]
        if not rank.isdigit() or int(rank) < 1:
            raise EngineError(f"--lora {text!r}: synthetic:RANK takes a rank >= 1, e.g. synthetic:64")
    elif not Path(text).is_file():
        raise EngineError(
            f"--lora {text!r} is not a file; pass a local .safetensors LoRA or synthetic:RANK (nothing is downloaded)"
        )


def check_cache_argument(args) -> None:
    """--cache's form, and what it is not run with, before anything is built."""
    text = getattr(args, "cache", None)
    if text is None:
        return
    from ..stepcache import parse_step_cache

    parse_step_cache(text)
    for flag, value in (("--vram", args.vram), ("--gpus", getattr(args, "gpus", 1) != 1)):
        if value:
            raise EngineError(f"--cache is not run with {flag} yet; run the cached configs with --preset alone")
