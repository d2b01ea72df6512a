"""FLUX.1 model variants: the architectures of dev, schnell, Fill, Canny / Depth, Kontext and tiny ones, their usage
limits, and the device checks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import VariantError

SYNTHETIC_PREFIX = "synthetic:"

# ----------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class ModelSpec:
    """One FLUX.1 variant: the configs of every component and its usage limits."""

    name: str
    transformer: dict
    t5: dict
    clip: dict
    vae: dict
    scheduler: dict
    clip_vocab_size: int
    t5_vocab_size: int  # the tokenizer's length; the model's embedding may be padded past it
    t5_max_length: int
    clip_max_length: int = 77
    default_steps: int = 28
    default_guidance: float = 3.5
    min_size: int = 256
    max_size: int = 2048
    needs_cuda: bool = True
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _flux_transformer(guidance_embeds: bool, in_channels: int = 64) -> dict:
    """FLUX.1's transformer; in_channels past 64 (Fill: 384, Canny / Depth: 128) take the conditioning latents packed
    beside the noise, and the output stays 64 wide."""
    extra = {"out_channels": 64} if in_channels != 64 else {}
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        **extra,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": guidance_embeds,
        "axes_dims_rope": (16, 56, 56),
    }


# google/t5-v1_1-xxl, as FLUX.1 ships it (text_encoder_2)
_T5_XXL = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": True,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
}

# openai/clip-vit-large-patch14 text tower, as FLUX.1 ships it (text_encoder)
_CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    # eos_token_id 2 makes CLIP pool at argmax(input_ids), as the real FLUX checkpoint does.
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

_FLUX_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
    "mid_block_add_attention": True,
}

_DEV_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def _dev_like(name: str, in_channels: int, steps: int, guidance: float, notes: str) -> ModelSpec:
    return ModelSpec(
        name=name, transformer=_flux_transformer(True, in_channels), t5=_T5_XXL, clip=_CLIP_L, vae=_FLUX_VAE,
        scheduler=_DEV_SCHEDULER, clip_vocab_size=49408, t5_vocab_size=32100, t5_max_length=512, default_steps=steps,
        default_guidance=guidance, notes=notes,
    )  # fmt: skip


VARIANTS: dict[str, ModelSpec] = {
    "flux-dev": ModelSpec(
        name="flux-dev",
        transformer=_flux_transformer(guidance_embeds=True),
        t5=_T5_XXL,
        clip=_CLIP_L,
        vae=_FLUX_VAE,
        scheduler=_DEV_SCHEDULER,
        clip_vocab_size=49408,
        t5_vocab_size=32100,
        t5_max_length=512,
        default_steps=28,
        default_guidance=3.5,
        notes="FLUX.1 [dev]: guidance-distilled, 28-50 steps",
    ),
    "flux-schnell": ModelSpec(
        name="flux-schnell",
        transformer=_flux_transformer(guidance_embeds=False),
        t5=_T5_XXL,
        clip=_CLIP_L,
        vae=_FLUX_VAE,
        scheduler={**_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False},
        clip_vocab_size=49408,
        t5_vocab_size=32100,
        t5_max_length=256,
        default_steps=4,
        default_guidance=0.0,
        notes="FLUX.1 [schnell]: timestep-distilled, 4 steps",
    ),
    # The editing and control models (diffusers' FluxFillPipeline, FluxControlPipeline, FluxKontextPipeline): dev's
    # transformer taking conditioning latents beside the noise (Fill: the masked image and the mask, 384 channels;
    # Canny / Depth: the control image, 128), or, for Kontext, dev's own (the reference image's tokens ride in the
    # sequence). Their usage limits are BFL's model cards'.
    "flux-fill": _dev_like("flux-fill", 384, steps=50, guidance=30.0, notes="FLUX.1 Fill [dev]: inpaint, outpaint"),
    "flux-canny": _dev_like("flux-canny", 128, steps=50, guidance=30.0, notes="FLUX.1 Canny [dev]: edge control"),
    "flux-depth": _dev_like("flux-depth", 128, steps=30, guidance=10.0, notes="FLUX.1 Depth [dev]: depth control"),
    "flux-kontext": _dev_like("flux-kontext", 64, steps=28, guidance=2.5, notes="FLUX.1 Kontext [dev]: image editing"),
    # Same classes, tiny sizes: the whole pipeline runs on a CPU in seconds. Keeps the real latent
    # layout (16 channels, VAE factor 8, 2x2 patches) so the size rules match the real models.
    "tiny": ModelSpec(
        name="tiny",
        transformer={
            "patch_size": 1,
            "in_channels": 64,
            "num_layers": 2,
            "num_single_layers": 2,
            # head_dim 64: the smallest our attention kernels take, so the tiny model runs them too
            "attention_head_dim": 64,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "pooled_projection_dim": 32,
            "guidance_embeds": True,
            "axes_dims_rope": (8, 28, 28),
        },
        t5={
            **_T5_XXL,
            "vocab_size": 1024,
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 64,
            "num_layers": 2,
            "num_heads": 4,
        },
        clip={
            **_CLIP_L,
            "vocab_size": 1000,
            "hidden_size": 32,
            "intermediate_size": 64,
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        vae={
            **_FLUX_VAE,
            "block_out_channels": [8, 8, 16, 16],
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "sample_size": 128,
        },
        scheduler=_DEV_SCHEDULER,
        clip_vocab_size=1000,
        t5_vocab_size=1000,
        t5_max_length=64,
        default_steps=4,
        default_guidance=3.5,
        min_size=32,
        max_size=2048,
        needs_cuda=False,
        notes="tiny random model for CPUs and tests",
    ),
}


def variant_spec(name: str) -> ModelSpec:
    """The spec of a variant, by name with or without the `synthetic:` prefix."""
    key = name.removeprefix(SYNTHETIC_PREFIX)
    if key not in VARIANTS:
        raise VariantError(
            f"unknown model variant {name!r}; valid variants: {', '.join(VARIANTS)} "
            f"(as `{SYNTHETIC_PREFIX}<variant>` for a synthetic model, or a local path)"
        )
    return VARIANTS[key]


def is_variant_name(model) -> bool:
    """Whether `model` names a random synthetic model: only `synthetic:<variant>` does. A bare name is a path, as in
    diffusers: a local folder named `tiny` or `flux-dev` loads that folder, never a random model in its place."""
    return isinstance(model, str) and model.startswith(SYNTHETIC_PREFIX)


def synthetic_hint(model) -> str:
    """For an error about a path that does not exist: the synthetic name the user may have meant, or ''."""
    name = str(model)
    return f"; for the random synthetic model of that name pass {SYNTHETIC_PREFIX + name!r}" if name in VARIANTS else ""


DEVICE_TYPES = ("cuda", "cpu")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """`device` as a torch.device this process can use (default: cuda when torch sees a GPU, else cpu), or a
    ConfigError that names the value and what would work, before anything is built."""
    from ..errors import ConfigError

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device {device!r} is not a device name; use 'cuda', 'cuda:1' or 'cpu'") from err
    if resolved.type not in DEVICE_TYPES:
        raise ConfigError(f"device {device!r}: flux-engine runs on {' or '.join(DEVICE_TYPES)}; use 'cuda' or 'cpu'")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ConfigError(
                f"device {device!r} asks for a CUDA GPU, but torch {torch.__version__} ({build}) sees none; use "
                "device 'cpu' (with the synthetic:tiny model), or install a CUDA build of torch on a machine with a GPU"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(
                f"device {device!r}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}; pick one of them"
            )
    return resolved


def check_device_fits_variant(spec: ModelSpec, device: torch.device) -> None:
    if spec.needs_cuda and device.type != "cuda":
        raise VariantError(
            f"the {spec.name} model needs a CUDA GPU (its transformer alone is ~22 GiB in bf16); "
            f"on {device.type} use `synthetic:tiny`"
        )


def _tiny_like(name: str, in_channels: int, notes: str) -> ModelSpec:
    tiny = VARIANTS["tiny"]
    transformer = {**tiny.transformer, "in_channels": in_channels, "out_channels": 64}
    return ModelSpec(**{**vars(tiny), "name": name, "transformer": transformer, "notes": notes})


VARIANTS["tiny-fill"] = _tiny_like("tiny-fill", 384, "tiny random Fill model (FluxFillPipeline) for CPUs and tests")
VARIANTS["tiny-control"] = _tiny_like(
    "tiny-control", 128, "tiny random Canny / Depth model (FluxControlPipeline) for CPUs and tests"
)
