"""Image sizes and step counts as users write them: parsing ('1024', '1360x768') and the checks with their fixes."""

from __future__ import annotations

from .errors import ConfigError, ResolutionError

IMAGE_MULTIPLE = 16  # VAE factor 8 x 2x2 latent patches


def parse_resolution(text: str) -> tuple[int, int]:
    """'1024' -> (1024, 1024); '1360x768' -> (height 768, width 1360): WIDTHxHEIGHT, as screens are named."""
    raw = text.strip().lower()
    try:
        if "x" in raw:
            width_text, height_text = raw.split("x", 1)
            width, height = int(width_text), int(height_text)
        else:
            width = height = int(raw)
    except ValueError as err:
        raise ResolutionError(
            f"resolution {text!r} is not a size; write one number for a square (1024) or WIDTHxHEIGHT (1360x768)"
        ) from err
    return height, width


def _nearest_multiples(value: int, multiple: int = IMAGE_MULTIPLE) -> tuple[int, int]:
    below = max(multiple, value // multiple * multiple)
    return below, below + multiple


def validate_resolution(
    height: int, width: int, min_size: int = 256, max_size: int = 2048, allow_any_size: bool = False
) -> None:
    """Raise ResolutionError unless height and width are multiples of 16 within [min_size, max_size]."""
    for name, value in (("height", height), ("width", width)):
        if value < IMAGE_MULTIPLE:
            raise ResolutionError(f"{name} {value} is too small; the smallest image is {IMAGE_MULTIPLE} pixels")
        if value % IMAGE_MULTIPLE:
            below, above = _nearest_multiples(value)
            raise ResolutionError(f"{name} {value} is not a multiple of {IMAGE_MULTIPLE}; use {below} or {above}")
        if not allow_any_size and not min_size <= value <= max_size:
            raise ResolutionError(
                f"{name} {value} is outside {min_size}..{max_size}, the sizes this model was made for; "
                f"pick a size in range or opt in with --allow-any-size"
            )


MAX_STEPS = 1000  # the FLUX schedulers' training timesteps: more steps than that only repeat sigmas, at seconds each


def validate_steps(steps: int) -> None:
    if not 1 <= steps <= MAX_STEPS:
        raise ConfigError(
            f"steps {steps} is outside 1..{MAX_STEPS} (FLUX.1-dev uses 28-50, schnell 4; {MAX_STEPS} is the "
            "scheduler's training timesteps, and each step takes a transformer forward)"
        )
