"""`python -m engine.generate "a prompt" --res 1024 --steps 28 --seed 0 -o out.png`: one image to a file; with
`--task kontext --image in.png` (or img2img, inpaint --mask, fill, control --control-image, ...) an edit of one."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .cli import add_model_arguments, check_launched, choose_model, default_guidance, end_parallel_run
from .config import resolve_config
from .errors import EngineError
from .files import check_writable, write_atomically, write_with_fallback
from .resolution import parse_resolution, validate_resolution, validate_steps
from .stepcache import parse_step_cache, with_step_cache
from .tasks import file_inputs

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
IMAGE_SUFFIXES = tuple(IMAGE_FORMATS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine.generate", description="Generate one FLUX.1 image.")
    parser.add_argument("prompt")
    parser.add_argument("--res", default="1024", help="1024 (square) or WIDTHxHEIGHT such as 1360x768")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the variant's)")
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", default="out.png", help="image path: .png, .jpg or .webp (default out.png)")
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a local LoRA .safetensors (diffusers/PEFT, kohya or BFL/xlabs format) at SCALE (default 1.0); "
        "repeat for several",
    )
    parser.add_argument("--image", default=None, help="--task img2img / inpaint / kontext / fill / ...: the image")
    parser.add_argument("--mask", default=None, help="--task inpaint / fill / ...: the mask (white: redrawn)")
    parser.add_argument("--control-image", default=None, help="--task control*: the control image (edges, depth)")
    parser.add_argument("--strength", type=float, default=None, help="--task img2img / inpaint / ...: 0..1")
    parser.add_argument(
        "--cache",
        default=None,
        help="step caching: fbcache:THRESHOLD, taylorseer:INTERVAL[:ORDER] or static:STEP,STEP,...[:ORDER] (e.g. "
        "taylorseer:5: 8 of 28 steps run fully)",
    )
    parser.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="context parallelism over this many GPUs: launch with `torchrun --nproc-per-node N -m engine.generate "
        "... --gpus N`; rank 0 writes the image",
    )
    return parser


def run(args) -> tuple[Path | None, bool]:
    """Generate and write the image; returns its path (None on a context-parallel rank other than 0, which writes
    nothing) and whether the model was synthetic (random weights)."""
    # what needs no model first, so that a typo is answered before torch and diffusers load
    if args.steps is not None:
        validate_steps(args.steps)
    output = Path(args.output)
    if output.suffix.lower() not in IMAGE_SUFFIXES:
        raise EngineError(
            f"-o {str(output)!r} has no image suffix; use one of {', '.join(IMAGE_SUFFIXES)}, e.g. -o out.png"
        )
    config = resolve_config(args.preset)
    if args.cache is not None:
        config = with_step_cache(config, parse_step_cache(args.cache))
    check_launched(args.gpus, "engine.generate")
    if args.gpus != 1:
        from .parallel.apply import with_parallel

        config = with_parallel(config, args.gpus)
    validate_resolution(*parse_resolution(args.res), allow_any_size=True)
    check_writable(output, "-o")
    loras = [parse_lora(text) for text in args.lora]
    inputs = file_inputs(args.task, args.image, args.mask, args.control_image, args.strength)
    if args.gpus != 1 and args.task != "text-to-image":
        raise EngineError(f"--gpus {args.gpus} runs --task text-to-image only; run --task {args.task} on one GPU")

    import torch

    from .engines import FluxEngine

    choice = choose_model(args, [args.res])
    spec, device, model = choice.spec, choice.device, choice.model
    ((height, width),) = choice.sizes
    steps = args.steps if args.steps is not None else (spec.default_steps if spec else 28)
    pipe = FluxEngine.from_pretrained(
        model,
        config=config,
        device=device,
        seed=args.seed,
        config_folder=args.config_folder,
        task=args.task,
        controlnet=args.controlnet,
    )
    if loras:
        names = [f"lora{index}" for index in range(len(loras))]
        from .lora_calls import load_lora_file

        for name, (path, _) in zip(names, loras, strict=True):
            load_lora_file(pipe, path, adapter_name=name)
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    if args.task.startswith("kontext"):  # diffusers' Kontext scales the output to max_area (1024^2 by default)
        inputs["max_area"] = height * width
    guidance = args.guidance if args.guidance is not None else default_guidance(spec)
    max_sequence_length = min(512, pipe.tokenizer_2.model_max_length)
    result = pipe(
        prompt=args.prompt,  # by name: FluxKontextPipeline's call takes `image` first
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
        max_sequence_length=max_sequence_length,
        **inputs,
    )
    if result is None:  # a context-parallel rank other than 0: rank 0 writes the image
        return None, spec is not None
    image = result.images[0]
    image_format = IMAGE_FORMATS[output.suffix.lower()]
    written = write_with_fallback(
        output, lambda path: write_atomically(path, lambda tmp: image.save(tmp, format=image_format)), "the image"
    )
    if written is None:
        raise EngineError(f"-o {str(output)!r}: the image could not be written (see above); free some disk space")
    return written, spec is not None


def parse_lora(text: str) -> tuple[Path, float]:
    """'PATH' or 'PATH:SCALE' -> (an existing local file, scale); refused before any model is built."""
    if text.startswith("synthetic:"):
        raise EngineError(
            f"--lora {text!r}: synthetic adapters are engine.bench's (python -m engine.bench --lora {text}); "
            "engine.generate takes a local .safetensors LoRA, optionally with :SCALE"
        )
    path_text, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            path_text, scale = head, float(tail)
        except ValueError:
            path_text, scale = text, 1.0  # a colon inside the path
            if Path(head).is_file():
                raise EngineError(
                    f"--lora {text!r}: the scale {tail!r} after the file's name is not a number; e.g. --lora {head}:0.8"
                ) from None
    path = Path(path_text)
    if not path.is_file():
        raise EngineError(
            f"--lora {text!r}: {str(path)!r} is not a file; pass a local .safetensors LoRA, optionally with :SCALE "
            "(e.g. --lora style.safetensors:0.8); nothing is downloaded"
        )
    if not math.isfinite(scale):
        raise EngineError(f"--lora {text!r}: the scale {scale} must be a finite number (e.g. 0.8)")
    return path, scale


def main(argv: list[str] | None = None) -> int:
    return end_parallel_run(_main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        output, synthetic = run(args)
    except EngineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if output is None:
        return 0
    print(f"wrote {output}")
    if output != Path(args.output):
        return 2
    if synthetic:
        print(
            "note: the model is synthetic (random weights), so the image is noise; pass --model with a local "
            "FLUX.1 folder or .safetensors for a real picture"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
