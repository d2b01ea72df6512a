"""FLUX.1 model variants: architectures, synthetic random-init builders, synthetic tokenizers, local loading.

No code path here reaches a model hub. Synthetic models are built directly on the target device in
the target dtype (the modules' own initialisers run there; no fp32 copy ever exists), deterministic
by seed. Real checkpoints load from a local diffusers-format folder or from a BFL single-file
transformer `.safetensors` plus a diffusers-format folder for everything else.

Components to be quantised (`load_local_components(..., quant=QuantConfig(...))`) are not loaded whole:
they are built on the meta device and filled one module at a time from their safetensors (`stream_into`),
each Linear quantised as soon as it is filled, so the device peak is the quantised size plus one layer.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError, VariantError

logger = logging.getLogger(__name__)

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


def _flux_transformer(guidance_embeds: bool) -> dict:
    return {
        "patch_size": 1,
        "in_channels": 64,
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


def is_variant_name(model: str) -> bool:
    return model.startswith(SYNTHETIC_PREFIX) or model in VARIANTS


# ----------------------------------------------------------------------------- synthetic tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def synthetic_clip_tokenizer(vocab_size: int, max_length: int = 77):
    """A byte-level BPE tokenizer of CLIP's shape: `vocab_size` tokens, bos/eos the last two ids.

    The merges are made up (prefixes grown one character at a time), so any text tokenizes and
    the sequence lengths behave like CLIP's; the ids mean nothing.
    """
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    target = vocab_size - len(specials)
    base = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for symbol in base + [b + "</w>" for b in base]:
        vocab.setdefault(symbol, len(vocab))
    merges: list[tuple[str, str]] = []
    alphabet = string.ascii_lowercase + string.digits
    prefixes = list(alphabet)
    index = 0
    while len(vocab) < target and index < len(prefixes):
        prefix = prefixes[index]
        index += 1
        for char in alphabet:
            for end in (char, char + "</w>"):
                if len(vocab) >= target:
                    break
                token = prefix + end
                if token in vocab:
                    continue
                vocab[token] = len(vocab)
                merges.append((prefix, end))
                if not end.endswith("</w>"):
                    prefixes.append(token)
    if len(vocab) > target:
        raise ValueError(f"CLIP vocab_size {vocab_size} is below the {len(vocab) + 2} byte-level base tokens")
    for token in specials:
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def synthetic_t5_tokenizer(vocab_size: int, max_length: int):
    """A Unigram tokenizer of T5's shape: pad 0, eos 1, unk 2, 100 sentinel ids at the top.

    `vocab_size` counts the sentinels, as `len(T5TokenizerFast)` does (32100 for T5-XXL).
    """
    from transformers import T5Tokenizer

    extra_ids = 100
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    target = vocab_size - extra_ids
    seen = {p for p, _ in pieces}
    alphabet = string.ascii_lowercase + string.digits + string.punctuation
    frontier = [""]
    while len(pieces) < target and frontier:
        next_frontier = []
        for stem in frontier:
            for char in alphabet:
                for piece in ("\u2581" + stem + char, stem + char):
                    if len(pieces) >= target:
                        break
                    if piece in seen:
                        continue
                    seen.add(piece)
                    pieces.append((piece, -float(len(piece))))
                next_frontier.append(stem + char)
        frontier = next_frontier
    return T5Tokenizer(vocab=pieces, extra_ids=extra_ids, model_max_length=max_length)


# ----------------------------------------------------------------------------- synthetic builders


@contextlib.contextmanager
def dtype_as_default(dtype: torch.dtype):
    """Within the block, new floating tensors and parameters default to `dtype`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _build_transformer(spec: ModelSpec):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**spec.transformer)


def _build_t5(spec: ModelSpec, dtype: torch.dtype):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**spec.t5)
    return T5EncoderModel._from_config(config, dtype=dtype)


def _build_clip(spec: ModelSpec, dtype: torch.dtype):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**spec.clip)
    return CLIPTextModel._from_config(config, dtype=dtype)


def _build_vae(spec: ModelSpec):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**spec.vae)


def build_scheduler(spec: ModelSpec):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**spec.scheduler)


DEVICE_TYPES = ("cuda", "cpu")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """`device` as a torch.device this process can use (default: cuda when torch sees a GPU, else cpu), or a
    ConfigError that names the value and what would work, before anything is built."""
    from .errors import ConfigError

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


def synthetic_components(
    variant: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> dict:
    """Every FluxPipeline component of `variant`, random-init on `device` in `dtype`.

    Deterministic by seed on a given device (the global RNG is forked, so callers' streams are
    untouched). Modules are constructed under `torch.device(device)` with `dtype` as the default,
    so each parameter is born where and how it will live: a 12B transformer builds on an H100
    without a 48 GB fp32 detour.
    """
    spec = variant_spec(variant)
    device = torch.device(device)
    check_device_fits_variant(spec, device)
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch.device(device), dtype_as_default(dtype):
        torch.manual_seed(seed)
        transformer = _build_transformer(spec)
        text_encoder_2 = _build_t5(spec, dtype)
        text_encoder = _build_clip(spec, dtype)
        vae = _build_vae(spec)
    components = {
        "transformer": transformer.eval().requires_grad_(False),
        "text_encoder": text_encoder.eval().requires_grad_(False),
        "text_encoder_2": text_encoder_2.eval().requires_grad_(False),
        "vae": vae.eval().requires_grad_(False),
        "tokenizer": synthetic_clip_tokenizer(spec.clip_vocab_size, spec.clip_max_length),
        "tokenizer_2": synthetic_t5_tokenizer(spec.t5_vocab_size, spec.t5_max_length),
        "scheduler": build_scheduler(spec),
    }
    return components


def synthetic_pipeline(
    variant: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    pipeline_class=None,
):
    """A plain `diffusers.FluxPipeline` (or `pipeline_class`) of synthetic components."""
    if pipeline_class is None:
        from diffusers import FluxPipeline as pipeline_class
    return pipeline_class(**synthetic_components(variant, device=device, dtype=dtype, seed=seed))


# ----------------------------------------------------------------------------- BFL single-file format

# diffusers name -> BFL name, for tensors that map one to one (per block, `{i}` is the block index).
_BFL_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}
_BFL_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
}
_BFL_DOUBLE_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_BFL_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_BFL_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    # BFL's final adaLN splits into (shift, scale); diffusers' into (scale, shift).
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def diffusers_to_bfl(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict in the BFL (black-forest-labs/flux) layout."""
    out: dict[str, torch.Tensor] = {}
    for src, dst in _BFL_TOP.items():
        for kind in ("weight", "bias"):
            if f"{src}.{kind}" in state:
                out[f"{dst}.{kind}"] = state[f"{src}.{kind}"]
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(state[f"norm_out.linear.{kind}"])
    for i in range(config["num_layers"]):
        pre, bfl = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for src, dst in _BFL_DOUBLE.items():
            for kind in ("weight", "bias"):
                out[f"{bfl}{dst}.{kind}"] = state[f"{pre}{src}.{kind}"]
        for src, dst in _BFL_DOUBLE_NORMS.items():
            out[f"{bfl}{dst}.scale"] = state[f"{pre}{src}.weight"]
        for kind in ("weight", "bias"):
            out[f"{bfl}img_attn.qkv.{kind}"] = torch.cat([state[f"{pre}attn.to_{p}.{kind}"] for p in "qkv"])
            out[f"{bfl}txt_attn.qkv.{kind}"] = torch.cat([state[f"{pre}attn.add_{p}_proj.{kind}"] for p in "qkv"])
    for i in range(config["num_single_layers"]):
        pre, bfl = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for src, dst in _BFL_SINGLE.items():
            for kind in ("weight", "bias"):
                out[f"{bfl}{dst}.{kind}"] = state[f"{pre}{src}.{kind}"]
        for src, dst in _BFL_SINGLE_NORMS.items():
            out[f"{bfl}{dst}.scale"] = state[f"{pre}{src}.weight"]
        for kind in ("weight", "bias"):
            parts = [state[f"{pre}attn.to_{p}.{kind}"] for p in "qkv"] + [state[f"{pre}proj_mlp.{kind}"]]
            out[f"{bfl}linear1.{kind}"] = torch.cat(parts)
    return out


@dataclass(frozen=True)
class _BflSource:
    """Where one diffusers tensor lives in a BFL checkpoint: a key, optionally a range of its rows, optionally
    with its two halves swapped (the final adaLN)."""

    key: str
    rows: tuple[int, int | None] | None = None
    swap_halves: bool = False

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            tensor = tensor[self.rows[0] : self.rows[1]]
        return _swap_halves(tensor) if self.swap_halves else tensor


def _bfl_plan(config: dict) -> dict[str, _BflSource]:
    """diffusers name -> its source in a BFL checkpoint of `config` (sized from it, not assuming 3072 wide)."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    thirds = [(j * inner, (j + 1) * inner) for j in range(3)]
    plan: dict[str, _BflSource] = {}
    for dst, src in _BFL_TOP.items():
        if dst.startswith("time_text_embed.guidance") and not config.get("guidance_embeds", False):
            continue
        for kind in ("weight", "bias"):
            plan[f"{dst}.{kind}"] = _BflSource(f"{src}.{kind}")
    for kind in ("weight", "bias"):
        plan[f"norm_out.linear.{kind}"] = _BflSource(f"final_layer.adaLN_modulation.1.{kind}", swap_halves=True)
    for i in range(config["num_layers"]):
        pre, bfl = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for dst, src in _BFL_DOUBLE.items():
            for kind in ("weight", "bias"):
                plan[f"{pre}{dst}.{kind}"] = _BflSource(f"{bfl}{src}.{kind}")
        for dst, src in _BFL_DOUBLE_NORMS.items():
            plan[f"{pre}{dst}.weight"] = _BflSource(f"{bfl}{src}.scale")
        for kind in ("weight", "bias"):
            for p, rows in zip("qkv", thirds, strict=True):
                plan[f"{pre}attn.to_{p}.{kind}"] = _BflSource(f"{bfl}img_attn.qkv.{kind}", rows)
                plan[f"{pre}attn.add_{p}_proj.{kind}"] = _BflSource(f"{bfl}txt_attn.qkv.{kind}", rows)
    for i in range(config["num_single_layers"]):
        pre, bfl = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for dst, src in _BFL_SINGLE.items():
            for kind in ("weight", "bias"):
                plan[f"{pre}{dst}.{kind}"] = _BflSource(f"{bfl}{src}.{kind}")
        for dst, src in _BFL_SINGLE_NORMS.items():
            plan[f"{pre}{dst}.weight"] = _BflSource(f"{bfl}{src}.scale")
        for kind in ("weight", "bias"):
            for p, rows in zip("qkv", thirds, strict=True):
                plan[f"{pre}attn.to_{p}.{kind}"] = _BflSource(f"{bfl}linear1.{kind}", rows)
            plan[f"{pre}proj_mlp.{kind}"] = _BflSource(f"{bfl}linear1.{kind}", (3 * inner, None))
    return plan


def _check_bfl_keys(keys: set[str], plan: dict[str, _BflSource], config: dict) -> None:
    """KeyError for the first tensor the plan needs that `keys` lacks; CheckpointError for tensors it does not use."""
    for source in plan.values():
        if source.key not in keys:
            raise KeyError(source.key)
    unexpected = sorted(keys - {source.key for source in plan.values()})
    if unexpected:
        raise CheckpointError(
            f"the checkpoint has {len(unexpected)} tensors a FLUX transformer of this config does not use, "
            f"e.g. {unexpected[:3]}; is it a FLUX.1 transformer with {config['num_layers']} double and "
            f"{config['num_single_layers']} single blocks?"
        )


_BFL_PREFIX = "model.diffusion_model."


def bfl_to_diffusers(checkpoint: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The inverse of `diffusers_to_bfl`, sized from `config` (diffusers' own converter assumes 3072 wide)."""
    state = {k.removeprefix(_BFL_PREFIX): v for k, v in checkpoint.items()}
    plan = _bfl_plan(config)
    _check_bfl_keys(set(state), plan, config)
    return {name: source.take(state[source.key]) for name, source in plan.items()}


def save_bfl_single_file(transformer, path: str | Path) -> Path:
    """Write a diffusers FluxTransformer2DModel as one BFL-layout `.safetensors` file."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in transformer.state_dict().items()}
    save_file(diffusers_to_bfl(state, dict(transformer.config)), str(path))
    return path


# ----------------------------------------------------------------------------- local loading


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist; pass the path of a local .safetensors")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(
            f"{str(path)!r} is not a readable safetensors file ({err}); it may be truncated or corrupt: "
            "copy or re-save it"
        ) from err


# what a FluxPipeline folder must hold (FluxPipeline's optional image_encoder / feature_extractor may be absent)
PIPELINE_COMPONENTS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae")


def _check_diffusers_folder(folder: Path, single_file: bool = False) -> None:
    """A readable model_index.json and a folder for each component (the transformer's may be absent when a
    single-file transformer replaces it), before diffusers is asked: its own messages name its internals."""
    if not folder.exists():
        raise CheckpointError(f"model folder {str(folder)!r} does not exist; pass a local diffusers-format folder")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(
            f"{str(folder)!r} is not a diffusers-format FLUX folder (no model_index.json); save one with "
            "`pipe.save_pretrained(folder)` or pass a BFL single-file transformer with its config folder"
        )
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{str(index_path)!r} is not readable JSON ({err}); copy it again from the model you downloaded"
        ) from err
    needed = [name for name in PIPELINE_COMPONENTS if not (single_file and name == "transformer")]
    missing = [name for name in needed if not isinstance(index, dict) or not (folder / name).is_dir()]
    if missing:
        raise CheckpointError(
            f"{str(folder)!r} lacks the component folder(s) {', '.join(missing)}; a FLUX.1 diffusers folder holds "
            f"{', '.join(PIPELINE_COMPONENTS)} beside model_index.json: copy the whole model folder"
        )


# ----------------------------------------------------------------------------- streamed loading (quantise as read)


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"{str(path)!r} is not a readable safetensors file ({err}); it may be truncated or corrupt: copy or re-save it"
    )


class SafetensorsReader:
    """The tensors of one or more safetensors files, each read from disk only when asked for (one at a time)."""

    def __init__(self, files: list[Path]):
        from safetensors import SafetensorError, safe_open

        self._stack = contextlib.ExitStack()
        self._where: dict[str, tuple[Path, object]] = {}
        for path in files:
            if not path.is_file():
                raise CheckpointError(
                    f"checkpoint file {str(path)!r} does not exist; pass the path of a local .safetensors"
                )
            try:
                handle = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except (SafetensorError, OSError, RuntimeError, ValueError) as err:
                self.close()
                raise _unreadable(path, err) from err
            names = handle.keys()  # a safe_open handle is not iterable
            self._where.update((key, (path, handle)) for key in names)

    def keys(self) -> set[str]:
        return set(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        from safetensors import SafetensorError

        path, handle = self._where[key]
        try:
            return handle.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise _unreadable(path, err) from err

    def metadata(self) -> dict:
        handles = {id(h): h for _, h in self._where.values()}
        return next((h.metadata() or {} for h in handles.values()), {})

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BflReader:
    """A BFL single-file transformer read in diffusers names, one tensor at a time (fused qkv / linear1 rows are
    sliced out of the last BFL tensor read, which is kept for its next slices)."""

    def __init__(self, path: Path, config: dict):
        self._reader = SafetensorsReader([path])
        keys = self._reader.keys()
        self._prefix = _BFL_PREFIX if any(k.startswith(_BFL_PREFIX) for k in keys) else ""
        self._plan = _bfl_plan(config)
        try:
            _check_bfl_keys({k.removeprefix(self._prefix) for k in keys}, self._plan, config)
        except (KeyError, CheckpointError):
            self.close()
            raise
        self._last: tuple[str, torch.Tensor] | None = None

    def keys(self) -> set[str]:
        return set(self._plan)

    def __contains__(self, key: str) -> bool:
        return key in self._plan

    def get(self, key: str) -> torch.Tensor:
        source = self._plan[key]
        if self._last is None or self._last[0] != source.key:
            self._last = None  # drop the previous tensor before reading the next
            self._last = (source.key, self._reader.get(self._prefix + source.key))
        return source.take(self._last[1])

    def close(self) -> None:
        self._last = None
        self._reader.close()

    def __enter__(self) -> BflReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stream_into(
    model: torch.nn.Module,
    reader,
    device: torch.device | str,
    target_dtype,
    quantizer=None,
    source: str = "",
) -> None:
    """Fill `model`, built with its parameters on the meta device, from `reader`, one module at a time.

    Each tensor is read, cast to `target_dtype(name, meta_tensor)` and moved to `device` as its module comes up,
    so at most one module's tensors exist outside the model. The Linears `quantizer` names
    (`quantizer.layer_names(model)`) are handed, filled, to `quantizer(name, linear)` and replaced by what it
    returns, before the next module is read: the device never holds more than one of them unquantised.
    Buffers the checkpoint does not hold (non-persistent ones, built for real by `empty_model`) are moved to
    `device`. Tied weights are tied afterwards (`tie_weights`); anything still on the meta device then is a
    tensor the checkpoint lacks (CheckpointError).
    """
    device = torch.device(device)
    targets = quantizer.layer_names(model) if quantizer is not None else set()
    consumed: set[str] = set()
    with torch.no_grad():
        for name in [n for n, _ in model.named_modules()]:  # names: a module list would pin every bf16 layer
            module = model.get_submodule(name)
            _fill_module(module, name, reader, device, target_dtype, consumed, source)
            if name in targets:
                _check_filled(module, name, source)
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, quantizer(name, module))
            del module
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    _check_filled(model, "", source)
    unused = sorted(reader.keys() - consumed)
    if unused:
        logger.warning("%s: %d tensors the model does not use were ignored, e.g. %s", source, len(unused), unused[:3])
    if quantizer is not None:
        quantizer.finish(model)
    model.eval().requires_grad_(False)


def _check_filled(module: torch.nn.Module, name: str, source: str) -> None:
    state = module.state_dict(keep_vars=True, prefix=f"{name}." if name else "")
    missing = [key for key, value in state.items() if isinstance(value, torch.Tensor) and value.is_meta]
    if missing:
        raise CheckpointError(
            f"{source!r} lacks {len(missing)} tensors of its model, e.g. {missing[:3]}; is it the checkpoint of "
            "this config (and complete)?"
        )


def _fill_module(module, name, reader, device, target_dtype, consumed: set[str], source: str) -> None:
    for leaf, meta in list(module._parameters.items()) + list(module._buffers.items()):
        if meta is None:
            continue
        key = f"{name}.{leaf}" if name else leaf
        if not meta.is_meta:  # a non-persistent buffer built for real, or a weight tied to one already read
            if meta.device != device and leaf in module._buffers:
                module._buffers[leaf] = meta.to(device)
            continue
        if key not in reader:
            continue  # tied (tie_weights) or missing (reported after)
        tensor = reader.get(key)
        if tensor.shape != meta.shape:
            raise CheckpointError(
                f"{source!r}: tensor {key!r} has shape {tuple(tensor.shape)}, the model's config needs "
                f"{tuple(meta.shape)}; is it the checkpoint of this config?"
            )
        tensor = tensor.to(device=device, dtype=target_dtype(key, meta))
        consumed.add(key)
        if leaf in module._parameters:
            module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[leaf] = tensor
        del tensor


def _meta_dtype(key: str, meta: torch.Tensor) -> torch.dtype:
    return meta.dtype


def _component_class(folder: Path, component: str):
    library, class_name = json.loads((folder / "model_index.json").read_text())[component]
    return library, getattr(importlib.import_module(library), class_name)


def empty_model(folder: Path, component: str, dtype: torch.dtype):
    """`component` of the diffusers-format `folder`, built from its config with its parameters on the meta device
    (buffers for real, as the libraries' loaders do), in `dtype`; with the per-tensor dtype rule of its library's
    loader: the meta tensor's dtype, or fp32 where transformers keeps a module in fp32 (its dtype plan)."""
    from accelerate import init_empty_weights

    library, cls = _component_class(folder, component)
    subfolder = folder / component
    with init_empty_weights(include_buffers=False):
        if library == "diffusers":
            with dtype_as_default(dtype):
                model = cls.from_config(cls.load_config(str(subfolder)))
        else:
            model = cls._from_config(cls.config_class.from_pretrained(str(subfolder)), dtype=dtype)
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return model, _meta_dtype
    kept = [(re.compile(glob.replace("*", ".*")), kept_dtype) for glob, kept_dtype in plan.items()]

    def target_dtype(key: str, meta: torch.Tensor) -> torch.dtype:
        if meta.is_floating_point():
            for pattern, kept_dtype in kept:
                if pattern.search(key):
                    return kept_dtype
        return meta.dtype

    return model, target_dtype


def component_weight_files(subfolder: Path) -> list[Path] | None:
    """The safetensors files a library's loader reads for one component folder (sharded or not); None if it has
    none (e.g. only .bin weights)."""
    for index_name in ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json"):
        index = subfolder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [subfolder / name for name in sorted(set(weight_map.values()))]
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (subfolder / name).is_file():
            return [subfolder / name]
    return None


def _load_quantizer(component: str, quant):
    mode = getattr(quant, component)
    if mode == "none":
        return None
    from .quantize import LoadQuantizer

    return LoadQuantizer(component, mode, quant.nf4_double_quant)


def load_component_quantized(folder: Path, component: str, device, dtype: torch.dtype, quant):
    """`component` of a diffusers-format folder, each quantisable Linear quantised (per `quant`) as it is read:
    the device peak is the quantised component plus one layer. None when the folder has no safetensors for it."""
    files = component_weight_files(folder / component)
    if files is None:
        logger.warning(
            "%s has no safetensors weights: loading it whole and quantising afterwards (the peak is its full size)",
            folder / component,
        )
        return None
    model, target_dtype = empty_model(folder, component, dtype)
    with SafetensorsReader(files) as reader:
        stream_into(model, reader, device, target_dtype, _load_quantizer(component, quant), str(folder / component))
    return model


def load_transformer_single_file(path: str | Path, config_folder: str | Path, device, dtype: torch.dtype, quant=None):
    """A FluxTransformer2DModel from a BFL single-file `.safetensors`; config from `config_folder/transformer`.

    quant: a QuantConfig; a transformer mode other than 'none' quantises each Linear as it is read (the device
    never holds the bf16 transformer).
    """
    from diffusers import FluxTransformer2DModel

    config_path = Path(config_folder) / "transformer" / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"no transformer config at {str(config_path)!r}; the config folder must be a diffusers-format "
            "FLUX folder (it provides the architecture and the other components)"
        )
    config = json.loads(config_path.read_text())
    quantizer = _load_quantizer("transformer", quant) if quant is not None else None
    try:
        if quantizer is not None:
            return _stream_single_file(Path(path), config, device, dtype, quantizer)
        state = bfl_to_diffusers(_read_safetensors(Path(path)), config)
    except KeyError as err:
        raise CheckpointError(
            f"{str(path)!r} lacks the tensor {err.args[0]!r} of a BFL FLUX transformer with "
            f"{config['num_layers']} double and {config['num_single_layers']} single blocks; is it the "
            "transformer of the same variant as the config folder?"
        ) from err
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(config)
    try:
        transformer.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{str(path)!r} does not fit the transformer config: {err}") from err
    return transformer.to(device).eval().requires_grad_(False)


def _stream_single_file(path: Path, config: dict, device, dtype: torch.dtype, quantizer):
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with BflReader(path, config) as reader:
        with init_empty_weights(include_buffers=False), dtype_as_default(dtype):
            transformer = FluxTransformer2DModel.from_config(config)
        stream_into(transformer, reader, device, _meta_dtype, quantizer, str(path))
    return transformer


def load_local_components(
    path: str | Path,
    device: torch.device | str,
    dtype: torch.dtype,
    config_folder: str | Path | None = None,
    quant=None,
) -> dict:
    """FluxPipeline components from local files only.

    `path` is a diffusers-format folder, or a BFL single-file transformer `.safetensors`, in which
    case `config_folder` (a diffusers-format folder) provides the architecture and the other parts.

    quant: a QuantConfig (engine.config). Each component with a mode other than 'none' is built on the meta
    device and quantised layer by layer while its safetensors are read (engine.quantize.LoadQuantizer): the
    device peak is the quantised size plus one layer, and the result is identical to loading in `dtype` and
    calling apply_quantization with the same QuantConfig (which then leaves it as it is).
    A folder written by engine.quantize.save_quantized loads its quantised transformer as saved, whatever
    `quant` says for it ('none' or the saved mode; another mode is refused).
    """
    from diffusers import FluxPipeline

    from .config import QuantConfig

    quant = quant if quant is not None else QuantConfig()
    path = Path(path)
    single_file = path.suffix == ".safetensors"
    if single_file and config_folder is None:
        raise CheckpointError(
            f"{str(path)!r} is a single-file transformer; also pass the diffusers-format folder that holds "
            "its config and the other components (config_folder=... / --config-folder)"
        )
    folder = Path(config_folder) if single_file else path
    if single_file and not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist; pass the path of a local .safetensors")
    _check_diffusers_folder(folder, single_file)
    overrides = {}
    if single_file:
        overrides["transformer"] = load_transformer_single_file(path, folder, device, dtype, quant=quant)
    else:
        from .quantize import load_saved_quantized_transformer

        saved = load_saved_quantized_transformer(folder, device, dtype, quant)
        if saved is not None:
            overrides["transformer"] = saved
    for component in QuantConfig.COMPONENTS:
        if component not in overrides and getattr(quant, component) != "none":
            loaded = load_component_quantized(folder, component, device, dtype, quant)
            if loaded is not None:
                overrides[component] = loaded
    try:
        pipe = FluxPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True, **overrides)
    except Exception as err:  # noqa: BLE001 - diffusers raises many types for one cause: a bad folder
        raise CheckpointError(
            f"could not load the FLUX pipeline from {str(folder)!r}: {type(err).__name__}: {err}. "
            "Check that every component folder is complete (a truncated or missing weight file is the usual cause)"
        ) from err
    pipe.to(device)
    return dict(pipe.components)
