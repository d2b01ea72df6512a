"""`python -m engine.generate "a prompt" --res 1024 --steps 28 --seed 0 -o out.png`: one image to a file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .config import PRESETS, parse_resolution, resolve_config, validate_resolution, validate_steps
from .errors import EngineError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine.generate", description="Generate one FLUX.1 image.")
    parser.add_argument("prompt")
    parser.add_argument("--res", default="1024", help="1024 (square) or WIDTHxHEIGHT such as 1360x768")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the variant's)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (and weight seed for synthetic models)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the variant's)")
    parser.add_argument(
        "--model",
        default=None,
        help="a local diffusers folder, a BFL .safetensors (with --config-folder), or synthetic:<variant>. "
        "Default: synthetic:flux-dev on CUDA, synthetic:tiny without (random weights: the image is noise-like)",
    )
    parser.add_argument("--config-folder", default=None, help="diffusers-format folder for a single-file model")
    parser.add_argument("--preset", default="baseline", help=f"engine preset: {', '.join(PRESETS)}")
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when present)")
    parser.add_argument("--allow-any-size", action="store_true", help="accept sizes outside the model's range")
    parser.add_argument("-o", "--output", default="out.png", help="image path: .png, .jpg or .webp (default out.png)")
    return parser


def run(args) -> Path:
    from .models import SYNTHETIC_PREFIX, is_variant_name, variant_spec
    from .pipeline import FluxEngine, default_device

    device = torch.device(args.device) if args.device else default_device()
    model = args.model or SYNTHETIC_PREFIX + ("flux-dev" if device.type == "cuda" else "tiny")
    spec = variant_spec(model) if is_variant_name(model) else None
    height, width = parse_resolution(args.res)
    if spec is not None:
        validate_resolution(height, width, spec.min_size, spec.max_size, args.allow_any_size)
    else:
        validate_resolution(height, width, allow_any_size=args.allow_any_size)
    steps = args.steps if args.steps is not None else (spec.default_steps if spec else 28)
    validate_steps(steps)
    output = Path(args.output)
    if output.suffix.lower() not in IMAGE_SUFFIXES:
        raise EngineError(f"output {str(output)!r} has no image suffix; use one of {', '.join(IMAGE_SUFFIXES)}")
    config = resolve_config(args.preset)
    pipe = FluxEngine.from_pretrained(
        model, config=config, device=device, seed=args.seed, config_folder=args.config_folder
    )
    guidance = args.guidance if args.guidance is not None else (spec.default_guidance if spec else 3.5)
    max_sequence_length = min(512, pipe.tokenizer_2.model_max_length)
    image = pipe(
        args.prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
        max_sequence_length=max_sequence_length,
    ).images[0]
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".part" + output.suffix)
    image.save(tmp)
    tmp.replace(output)
    return output


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        output = run(args)
    except EngineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
