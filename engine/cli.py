"""What `engine.bench` and `engine.generate` share: the model/device/preset arguments and their checks."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import PRESETS, resolve_config
from .errors import CheckpointError
from .resolution import parse_resolution, validate_resolution
from .tasks import TASKS, check_task_name, check_variant_fits_task

if TYPE_CHECKING:  # torch and the models load after the arguments are parsed, so that --help answers at once
    import torch

    from .models.variants import ModelSpec


def add_model_arguments(parser: argparse.ArgumentParser, several_presets: bool = False) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="synthetic:flux-dev | synthetic:flux-schnell | synthetic:tiny (random weights) | a local diffusers "
        "folder | a BFL .safetensors (with --config-folder). Default: synthetic:flux-dev on CUDA, synthetic:tiny "
        "without",
    )
    parser.add_argument("--config-folder", default=None, help="diffusers-format folder for a single-file model")
    parser.add_argument(
        "--task",
        default="text-to-image",
        choices=list(TASKS),
        help="the FLUX.1 pipeline: text-to-image (FluxPipeline, default), img2img, inpaint, kontext, kontext-inpaint, "
        "fill, control, control-img2img, control-inpaint, controlnet (diffusers' class of each); the default --model "
        "is the synthetic variant of the task's architecture (Fill: 384 input channels, Canny / Depth: 128)",
    )
    parser.add_argument(
        "--controlnet",
        default=None,
        help="--task controlnet: a local diffusers-format FluxControlNetModel folder, or synthetic:VARIANT (random "
        "weights; the default with a synthetic --model)",
    )
    presets = ", ".join(PRESETS)
    if several_presets:
        help_text = (
            f"engine presets, comma-separated, or 'ladder' for all of them in order: {presets}. Default: the fastest "
            "config for this machine (on a GPU, the fastest preset predicted to fit its memory)"
        )
    else:
        help_text = f"engine preset: {presets}"
    parser.add_argument("--preset", default="baseline", help=help_text)
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the noise, and of the weights of a synthetic model"
    )
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the variant's)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when present)")
    parser.add_argument("--allow-any-size", action="store_true", help="accept sizes outside the model's range")


@dataclass
class ModelChoice:
    device: torch.device
    model: str  # "synthetic:<variant>" or a local path
    spec: ModelSpec | None  # None for a local model
    sizes: list[tuple[int, int]]  # (height, width)
    defaulted_to_tiny: bool


def choose_model(args, resolutions: list[str]) -> ModelChoice:
    """Check device, model, preset and sizes before anything heavy is built."""
    from .models.variants import (
        SYNTHETIC_PREFIX,
        check_device_fits_variant,
        is_variant_name,
        resolve_device,
        synthetic_hint,
        variant_spec,
    )

    device = resolve_device(args.device)
    task_name = getattr(args, "task", "text-to-image")
    task = check_task_name(task_name)
    model = args.model or SYNTHETIC_PREFIX + (task.variant if device.type == "cuda" else task.tiny)
    spec = variant_spec(model) if is_variant_name(model) else None
    if spec is not None:
        check_variant_fits_task(model, spec.transformer["in_channels"], task_name)
    check_controlnet_argument(args, task_name, model if spec is not None else None)
    if args.preset and "," not in args.preset and args.preset != "ladder":
        resolve_config(args.preset)
    if spec is None and not Path(model).exists():  # before the sizes, whose range would be a guess for it
        raise CheckpointError(
            f"--model {model!r} does not exist; pass a local diffusers-format folder (or a BFL .safetensors file with "
            "--config-folder), or a synthetic variant such as synthetic:flux-dev; nothing is downloaded"
            + synthetic_hint(model)
        )
    sizes = [parse_resolution(r) for r in resolutions]
    limits = (spec.min_size, spec.max_size) if spec is not None else (256, 2048)
    for height, width in sizes:
        validate_resolution(height, width, *limits, allow_any_size=args.allow_any_size)
    if spec is not None:
        check_device_fits_variant(spec, device)
        model = SYNTHETIC_PREFIX + spec.name
    return ModelChoice(device, model, spec, sizes, defaulted_to_tiny=args.model is None and device.type != "cuda")


def check_controlnet_argument(args, task: str, synthetic_model: str | None) -> None:
    """--controlnet: only with --task controlnet, where it defaults to the synthetic model's variant."""
    from pathlib import Path

    from .errors import EngineError
    from .models.variants import is_variant_name, synthetic_hint

    given = getattr(args, "controlnet", None)
    if task != "controlnet":
        if given is not None:
            raise EngineError(f"--controlnet is for --task controlnet; --task {task} takes none")
        return
    if given is None:
        if synthetic_model is None:
            raise EngineError("--task controlnet with a local --model needs --controlnet PATH (a ControlNet folder)")
        args.controlnet = synthetic_model
    elif not is_variant_name(given) and not Path(given).is_dir():
        raise EngineError(
            f"--controlnet {given!r} is not a folder; pass a local FluxControlNetModel folder{synthetic_hint(given)}"
        )


def default_guidance(spec: ModelSpec | None) -> float:
    return spec.default_guidance if spec is not None else 3.5


def end_parallel_run(code: int) -> int:
    """After a --gpus run: release the CUDA graphs and shut the process group down now, so that a hang in NCCL's
    teardown ends the process with the command's own exit code (engine.parallel.runtime.shutdown). Returns `code`.
    Nothing to do (and nothing imported) when the command ran on one process."""
    import sys

    runtime = sys.modules.get("engine.parallel.runtime")
    if runtime is not None:
        runtime.shutdown(exit_code_on_hang=code)
    return code


def check_launched(gpus: int, command: str) -> None:
    """--gpus N needs the N processes torchrun starts (checked from its environment, before torch loads)."""
    import os

    from .errors import EngineError

    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise EngineError(f"--gpus {gpus} must be an integer >= 1")
    if gpus == 1:
        return
    launched = os.environ.get("WORLD_SIZE")
    if launched != str(gpus):
        where = f"torchrun started {launched}" if launched else "this process was not started by torchrun"
        raise EngineError(
            f"--gpus {gpus} needs {gpus} processes, one per GPU; {where}: run "
            f"`torchrun --nproc-per-node {gpus} -m {command} ... --gpus {gpus}`"
        )
