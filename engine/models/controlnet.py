"""Synthetic FLUX.1 ControlNets: diffusers' FluxControlNetModel in the InstantX / Shakker-Labs layout (the FLUX.1
transformer's blocks, fewer of them: 5 double-stream and 10 single-stream for the real ones, 1 and 1 for `tiny`),
random weights by seed, built on the target device in the target dtype. Nothing is fetched from a model hub.

diffusers zero-initialises the projections that make a ControlNet's outputs (`controlnet_blocks`,
`controlnet_single_blocks`) and its control-image embedder (`controlnet_x_embedder`), so that training starts from
the base model; a trained ControlNet's are not zero, and a zero one would add nothing to the image. These are drawn
at random too (nn.Linear's own initialiser), so the control image and every block change the image, as they do
with a trained one.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, VariantError
from .builders import dtype_as_default
from .variants import variant_spec

# (double-stream, single-stream) blocks of the ControlNets per variant: InstantX's and Shakker-Labs' FLUX.1 [dev]
# ControlNets (Canny, Union, Union-Pro) have 5 and 10
CONTROLNET_LAYERS = {"tiny": (1, 1)}
REAL_CONTROLNET_LAYERS = (5, 10)
# the transformer settings a ControlNet copies (its blocks must match the transformer's width and heads)
_SHARED_KEYS = ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                "pooled_projection_dim", "guidance_embeds", "axes_dims_rope")  # fmt: skip
_ZERO_INITIALISED = ("controlnet_x_embedder", "controlnet_blocks", "controlnet_single_blocks")


def controlnet_config(
    variant: str = "tiny",
    num_layers: int | None = None,
    num_single_layers: int | None = None,
    num_mode: int | None = None,
) -> dict:
    """The FluxControlNetModel config of a ControlNet for `variant`'s transformer. num_mode: a Union ControlNet's
    number of control modes (InstantX / Shakker-Labs Union: 10), None for a single-mode one."""
    spec = variant_spec(variant)
    if spec.transformer["in_channels"] != 64:
        raise VariantError(
            f"variant {variant!r} has a {spec.transformer['in_channels']}-channel transformer; FluxControlNetPipeline "
            "feeds 64 latent channels. Build the ControlNet for 'tiny', 'flux-dev' or 'flux-schnell'"
        )
    default_layers, default_single = CONTROLNET_LAYERS.get(spec.name, REAL_CONTROLNET_LAYERS)
    layers = default_layers if num_layers is None else num_layers
    single = default_single if num_single_layers is None else num_single_layers
    for name, value in (("num_layers", layers), ("num_single_layers", single)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{name}={value!r} must be an integer >= 0 (FLUX.1 ControlNets: 5 and 10)")
    config = {key: spec.transformer[key] for key in _SHARED_KEYS}
    return {**config, "num_layers": layers, "num_single_layers": single, "num_mode": num_mode}


def synthetic_controlnet(
    variant: str = "tiny",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    num_layers: int | None = None,
    num_single_layers: int | None = None,
    num_mode: int | None = None,
):
    """A random-init FluxControlNetModel for `variant`'s transformer, on `device` in `dtype`, deterministic by seed
    (the global RNG is forked, so callers' streams are untouched); in eval mode, without gradients."""
    from diffusers import FluxControlNetModel

    config = controlnet_config(variant, num_layers, num_single_layers, num_mode)
    device = torch.device(device)
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch.device(device), dtype_as_default(dtype):
        torch.manual_seed(seed)
        controlnet = FluxControlNetModel(**config)
        for name in _ZERO_INITIALISED:
            for module in getattr(controlnet, name).modules():
                if isinstance(module, torch.nn.Linear):
                    module.reset_parameters()
    return controlnet.eval().requires_grad_(False)


def load_controlnet(source, device: torch.device | str, dtype: torch.dtype, seed: int = 0, variant: str | None = None):
    """A FluxControlNetModel (or FluxMultiControlNetModel) as given; loaded from a local diffusers-format folder (never
    from a hub); or 'synthetic:<variant>', random weights of that variant's ControlNet by `seed`."""
    from pathlib import Path

    from diffusers import FluxControlNetModel, FluxMultiControlNetModel

    from .variants import is_variant_name, synthetic_hint

    if isinstance(source, (FluxControlNetModel, FluxMultiControlNetModel)):
        return source
    if isinstance(source, str) and is_variant_name(source):
        return synthetic_controlnet(source, device=device, dtype=dtype, seed=seed)
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        model = FluxControlNetModel.from_pretrained(source, torch_dtype=dtype, local_files_only=True, variant=variant)
        return model.to(device)
    raise ConfigError(
        f"task='controlnet' needs controlnet=: a FluxControlNetModel, the path of a local ControlNet folder, or "
        f"'synthetic:<variant>' (random weights); got {source!r}{synthetic_hint(source)}"
    )
