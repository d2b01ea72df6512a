"""A fast tiled VAE decode (and encode) for FLUX, and the decode's peak memory by formula.

Why not diffusers' `enable_tiling()` (AutoencoderKL, diffusers 0.42):
- Tile geometry. The tile is `config.sample_size` (1024 px for FLUX, 128 latents) with 25% overlap, stepped by
  96 latents from 0 and never shifted back: at 2048x2048 (256 latents) it decodes 3x3 tiles of 128, 128 and 64
  latents, i.e. (128+128+64)^2 / 256^2 = 1.56x the pixels of one decode, in four different tile shapes. At
  1024x1024 it does not tile at all (tiling starts above 128 latents).
- Blending. `blend_v`/`blend_h` crossfade one row (column) at a time in a Python loop: 256 rows per seam,
  ~4 kernels each on a [B, 3, 1, 1024] slice, ~12 seams at 2048^2 -> ~12k tiny launches (~0.1-0.2 s on a GPU),
  then `torch.cat` of the cropped tiles (another full-size copy).
Neither accounts for the 39.5 s at 2048^2 and 8.8 s at 1024^2 measured earlier: at 1024^2 `decode` does not
tile at all, the 4.5x ratio of the two is the pixel ratio, and 0.1 GiB is far below one 1024-px tile's
activations (~2.4 GiB by `decode_peak_bytes`). That suggests the VAE did not run on the GPU (or not in bf16) in
that measurement; benchmarks/bench_vae.py times it again, beside the VAE's device.

What this module does instead (`tiled_decode`, `tiled_encode`):
- The fewest tiles per axis that keep `overlap` between neighbours, all of one size (<= `tile`, shrunk to
  fit), spread evenly so that the last one ends at the edge: no extra work beyond the (n-1)*overlap seams,
  one cuDNN plan for every tile. At 2048^2 with tile 1024 / overlap 128 that is 3x3 tiles of 768 px
  (1.27x the pixels; 2x2 needs a tile of 1088+).
- Blending by per-axis weights that sum to one (linear ramps over `overlap` at the inner edges, normalised
  with 1-D vector ops): each decoded tile is multiplied by its [h, w] weight and added into a preallocated
  output of the output dtype (the product is formed in fp32 on the tile only), so no full-size fp32 copy and
  no Python loop over rows.
- `apply_vae(pipe, VaeConfig)` swaps the instance's `_decode`/`_encode`, under diffusers' `decode`/`encode`,
  so FluxPipeline, `return_dict`, slicing and accelerate's hooks all work unchanged.

GroupNorm statistics (and the mid-block attention) see one tile, not the whole image, so a tiled decode is
close to, not equal to, an untiled one (tests/test_vae.py states the measured PSNR).
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import VaeConfig
from .errors import ConfigError, InputError

_STATE_ATTR = "_flux_engine_vae_state"

# ----------------------------------------------------------------------------- memory model constants
# Live-tensor counts of diffusers' eager AutoencoderKL, in units of (channels x pixels) of the tensor named.
# Which tensors are alive at each op is walked in `_resnet`, `_attention`, `_decoder_peak`, `_encoder_peak`
# below; with no workspace that walk matches a count of live tensors on the CPU to 0.2% (tests/test_vae.py).
# The coefficients here are the terms that depend on the kernels: calibrate them against GPU measurements
# (benchmarks/bench_vae.py prints measured and predicted GiB side by side).

# ResNet block: input + GroupNorm output + SiLU output (not in place) before conv1
RESNET_NORM_COPIES = 3
# ResNet block end: conv2 output, the residual sum and the `/ output_scale_factor` quotient (+1 with a shortcut)
RESNET_OUTPUT_COPIES = 3
# Upsample2D: the nearest-neighbour 2x tensor and the conv's output, both at the upsampled size
UPSAMPLE_COPIES = 2
# Mid-block attention, besides its input, per token and channel: GroupNorm output, q, k, v, the SDPA output,
# its reshaped copy, the residual sum and quotient, not all at once (6.5 measured on the CPU, rounded up)
ATTENTION_TOKEN_COPIES = 7
# Attention score matrices alive at once, per head and token^2: 0 for the fused (memory-efficient / flash)
# SDPA kernels that run head_dim 512 on GPUs and CPUs; ~2 if SDPA falls back to its math kernel.
ATTENTION_SCORE_COPIES = 0.0
# cuDNN workspace of a convolution, in copies of its input + output. A hypothesis that fits the one H100 figure
# we had (untiled 2048^2 decode: +9.5 GiB, of which live tensors are 6.0 GiB): NCHW bf16 convolutions run as
# NHWC kernels with both layout transposes in workspace; 1.0 reproduces it exactly, at the 2x-upsampler's conv.
# CPU convolutions need none (pass conv_workspace_copies=0).
CONV_WORKSPACE_COPIES = 1.0
# Tiled decode/encode, per tile while blending: the fp32 product tile x weight (4 bytes per element)
BLEND_FP32_BYTES = 4


# ----------------------------------------------------------------------------- tile layout


def vae_scale_factor(vae_config: Mapping) -> int:
    """Image pixels per latent, per side: 2 per down/up stage (8 for FLUX)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, stop) of each tile along one axis of `size`, for tiles of at most `tile` overlapping by at least
    `overlap` (all in the same unit: latents).

    The fewest tiles that can keep the overlap, all of one length (the smallest that covers `size`), spread
    evenly from 0 to the end: the work beyond one pass is only the (n-1) overlaps, and every tile has the
    same shape (one cuDNN plan, batchable).
    """
    if not 0 <= overlap < tile:
        raise ConfigError(f"tile_spans: overlap {overlap} must be in 0..{tile - 1} (less than the tile {tile})")
    if size <= tile:
        return [(0, size)]
    count = math.ceil((size - overlap) / (tile - overlap))
    length = math.ceil((size + (count - 1) * overlap) / count)  # <= tile, by the choice of count
    starts = [index * (size - length) // (count - 1) for index in range(count)]
    return [(start, start + length) for start in starts]


def tiling_work_ratio(height: int, width: int, tile: int = 1024, overlap: int = 128, scale: int = 8) -> float:
    """Pixels a tiled decode runs through the decoder over the image's pixels (>= 1): its extra conv work."""
    rows = tile_spans(height // scale, tile // scale, overlap // scale)
    cols = tile_spans(width // scale, tile // scale, overlap // scale)
    decoded = sum(stop - start for start, stop in rows) * sum(stop - start for start, stop in cols)
    return decoded / ((height // scale) * (width // scale))


def _axis_weights(spans: list[tuple[int, int]], ramp: int, device: torch.device) -> list[torch.Tensor]:
    """Per-tile blend weights along one axis (fp32, one vector per span) that sum to 1 at every position.

    Each tile's raw weight ramps linearly from ~0 to 1 over `ramp` positions at its inner edges (the image's
    own edges get no ramp), then all are divided by their sum: exact crossfades where two tiles overlap by
    `ramp`, and a valid partition of unity for any overlap. The unit of `spans` and `ramp` is the output's.
    """
    size = spans[-1][1]
    positions = torch.arange(size, device=device, dtype=torch.float32) + 0.5  # [size], pixel centres
    raw = torch.zeros(len(spans), size, device=device, dtype=torch.float32)  # [tiles, size]
    for index, (start, stop) in enumerate(spans):
        weight = torch.ones(stop - start, device=device, dtype=torch.float32)
        if ramp > 0 and index > 0:
            weight = torch.minimum(weight, (positions[start:stop] - start) / ramp)
        if ramp > 0 and index < len(spans) - 1:
            weight = torch.minimum(weight, (stop - positions[start:stop]) / ramp)
        raw[index, start:stop] = weight
    total = raw.sum(dim=0)  # [size], > 0: every position is inside some tile away from its zero end
    return [raw[index, start:stop] / total[start:stop] for index, (start, stop) in enumerate(spans)]


def _check_tiling_args(tile: int, overlap: int, scale: int) -> None:
    if not isinstance(tile, int) or tile < 2 * scale or tile % scale:
        raise ConfigError(
            f"tile={tile!r} must be a multiple of the VAE's scale factor {scale}, at least {2 * scale} "
            f"(e.g. 512 or 1024 pixels)"
        )
    if not isinstance(overlap, int) or overlap < 0 or overlap % scale or 2 * overlap >= tile:
        raise ConfigError(
            f"overlap={overlap!r} must be a multiple of {scale} in 0..{(tile // 2 - 1) // scale * scale} "
            f"(less than half of tile={tile}); 128 for 1024-pixel tiles is a good default"
        )


# ----------------------------------------------------------------------------- tiled decode / encode


def _check_latents(vae, latents: torch.Tensor) -> None:
    channels, scale = vae.config.latent_channels, vae_scale_factor(vae.config)
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != channels:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise InputError(
            f"latents have shape {shape}; the VAE decodes [batch, {channels}, height/{scale}, width/{scale}]. "
            "Unpack FLUX's "
            "packed [batch, tokens, 64] latents first (FluxPipeline._unpack_latents) and undo scaling_factor / "
            "shift_factor"
        )


def _check_images(vae, images: torch.Tensor, scale: int) -> None:
    channels = vae.config.in_channels
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != channels:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(
            f"images have shape {shape}; the VAE encodes [batch, {channels}, height, width] in [-1, 1] "
            "(VaeImageProcessor.preprocess makes them)"
        )
    height, width = images.shape[-2:]
    if height % scale or width % scale:
        raise InputError(
            f"images of {height}x{width} cannot be encoded in tiles: height and width must be multiples of {scale} "
            f"(e.g. {height // scale * scale}x{width // scale * scale}); crop or resize them"
        )


def _blend_tiles(
    run_tile, grid: tuple[int, int], tile: int, overlap: int, out_scale: int, device: torch.device
) -> torch.Tensor:
    """Run `run_tile(top, bottom, left, right)` on overlapping tiles of a latent grid of `grid` = (h, w) and blend
    its results ([B, C, th*out_scale, tw*out_scale]) into one [B, C, h*out_scale, w*out_scale] tensor of the
    results' dtype.

    tile and overlap are in latents; ramps are `overlap * out_scale` output positions long.
    """
    rows = tile_spans(grid[0], tile, overlap)
    cols = tile_spans(grid[1], tile, overlap)
    if len(rows) == 1 and len(cols) == 1:
        return run_tile(0, grid[0], 0, grid[1])
    # in the output's unit (image pixels for a decode, latents for an encode)
    out_rows = [(start * out_scale, stop * out_scale) for start, stop in rows]
    out_cols = [(start * out_scale, stop * out_scale) for start, stop in cols]
    row_weights = _axis_weights(out_rows, overlap * out_scale, device)
    col_weights = _axis_weights(out_cols, overlap * out_scale, device)
    out = None
    for (top, bottom), (out_top, out_bottom), row_weight in zip(rows, out_rows, row_weights, strict=True):
        for (left, right), (out_left, out_right), col_weight in zip(cols, out_cols, col_weights, strict=True):
            result = run_tile(top, bottom, left, right)  # [B, C, th, tw]
            if out is None:
                batch, channels = result.shape[:2]
                out = result.new_zeros(batch, channels, out_rows[-1][1], out_cols[-1][1])  # [B, C, H, W]
            # weight [th, tw] and the product in fp32, on the tile only; the in-place add computes in fp32 and
            # rounds into `out` once per tile that covers a pixel (1 inside a tile, 2-4 in the seams). Nothing of
            # this tile outlives the statement, so the next tile's decode starts from `out` alone.
            out[:, :, out_top:out_bottom, out_left:out_right].add_(result * (row_weight[:, None] * col_weight))
            del result
    return out


def tiled_decode(vae, latents: torch.Tensor, tile: int = 1024, overlap: int = 128) -> torch.Tensor:
    """Decode `latents` [B, C_latent, h, w] in overlapping tiles: the image [B, 3, 8h, 8w], as vae.decode's sample.

    tile, overlap: image pixels (multiples of the scale factor 8; overlap < tile / 2). An image no larger than
    one tile is decoded in one piece, identical to the untiled decode. Each tile decodes the whole batch, so
    sample b of a batch equals decoding sample b alone.
    """
    scale = vae_scale_factor(vae.config)
    _check_tiling_args(tile, overlap, scale)
    _check_latents(vae, latents)

    def decode_tile(top: int, bottom: int, left: int, right: int) -> torch.Tensor:
        z = latents[:, :, top:bottom, left:right]  # [B, C_latent, th, tw], a view
        if vae.post_quant_conv is not None:  # 1x1: per tile is exact
            z = vae.post_quant_conv(z)
        return vae.decoder(z)  # [B, 3, 8 th, 8 tw]

    return _blend_tiles(decode_tile, latents.shape[-2:], tile // scale, overlap // scale, scale, latents.device)


def tiled_encode(vae, images: torch.Tensor, tile: int = 1024, overlap: int = 128) -> torch.Tensor:
    """Encode `images` [B, 3, H, W] in overlapping tiles: the moments [B, 2*C_latent, H/8, W/8] (mean and
    log-variance, what `DiagonalGaussianDistribution` takes), as `vae._encode` returns them.

    tile, overlap: image pixels, as in `tiled_decode`; the blend ramps are overlap/8 latents long. Tiles are laid
    out on the latent grid, so every image tile is a multiple of the scale factor (H and W must be too).
    """
    scale = vae_scale_factor(vae.config)
    _check_tiling_args(tile, overlap, scale)
    _check_images(vae, images, scale)

    def encode_tile(top: int, bottom: int, left: int, right: int) -> torch.Tensor:
        pixels = images[:, :, top * scale : bottom * scale, left * scale : right * scale]  # [B, 3, th, tw], a view
        moments = vae.encoder(pixels)
        if vae.quant_conv is not None:
            moments = vae.quant_conv(moments)
        return moments  # [B, 2 C_latent, th/8, tw/8]

    grid = (images.shape[-2] // scale, images.shape[-1] // scale)
    return _blend_tiles(encode_tile, grid, tile // scale, overlap // scale, 1, images.device)


# ----------------------------------------------------------------------------- installing on a pipeline


@dataclass
class VaeState:
    """What `apply_vae` installed on a VAE: the config in force and how often each path ran.

    The wrappers are methods of this object and read `config` on every call, so applying a new config updates
    it in place. After `remove()`, `active` is False and the wrappers, wherever they still are, pass through.
    """

    vae: Any = field(repr=False)
    config: VaeConfig
    tiled_decodes: int = 0
    untiled_decodes: int = 0
    tiled_encodes: int = 0
    untiled_encodes: int = 0
    active: bool = True
    _originals: dict = field(default_factory=dict, repr=False)  # name -> the callable the wrapper falls back to
    _shadowed: dict = field(default_factory=dict, repr=False)  # name -> an instance attribute we replaced
    _wrappers: dict = field(default_factory=dict, repr=False)

    def tiles(self, height: int, width: int) -> bool:
        """Whether an image of height x width pixels is decoded (encoded) in tiles under `config`."""
        if not self.active or self.config.tiling == "off":
            return False
        return self.config.tiling == "on" or height > self.config.tile or width > self.config.tile

    def remove(self) -> None:
        """Restore the VAE's own `_decode`/`_encode`. If something wrapped them after us, our wrappers stay in
        its chain but pass every call straight through; either way a later `apply_vae` installs afresh."""
        self.active = False
        for name, wrapper in self._wrappers.items():
            if self.vae.__dict__.get(name) is not wrapper:
                continue  # wrapped again by someone else: stay inert in their chain
            if name in self._shadowed:
                setattr(self.vae, name, self._shadowed[name])
            else:
                delattr(self.vae, name)
        if self.vae.__dict__.get(_STATE_ATTR) is self:
            delattr(self.vae, _STATE_ATTR)


def vae_state_of(pipe_or_vae) -> VaeState | None:
    """The active VaeState installed on a pipeline's VAE (or on a VAE), else None."""
    vae = _vae_of(pipe_or_vae)
    state = vae.__dict__.get(_STATE_ATTR)
    return state if state is not None and state.active else None


def _vae_of(pipe_or_vae):
    vae = pipe_or_vae if hasattr(pipe_or_vae, "decoder") else getattr(pipe_or_vae, "vae", None)
    if vae is None or not all(hasattr(vae, name) for name in ("decoder", "encoder", "_decode", "_encode")):
        raise ConfigError(
            f"apply_vae needs a FluxPipeline (or a diffusers AutoencoderKL); got {type(pipe_or_vae).__name__} "
            f"whose vae is {type(vae).__name__}"
        )
    return vae


def apply_vae(pipe, config: VaeConfig) -> VaeState | None:
    """Install `config`'s decode/encode strategy on `pipe.vae` (or on a VAE passed directly), in place.

    tiling 'off': nothing is installed (a strategy installed before is removed) and None is returned.
    'on': every decode/encode goes through `tiled_decode`/`tiled_encode`; 'auto': only images larger than one
    tile in either dimension. The instance's `_decode`/`_encode` are replaced, below diffusers' `decode`/`encode`,
    so `return_dict`, slicing and accelerate's offload hooks behave as before. Applying again updates the
    installed state instead of wrapping twice; `state.remove()` or `remove_vae_tiling(pipe)` undoes it.
    """
    if not isinstance(config, VaeConfig):
        raise ConfigError(f"apply_vae takes a VaeConfig, got {type(config).__name__}")
    vae = _vae_of(pipe)
    state = vae_state_of(vae)
    if config.tiling == "off":
        if state is not None:
            state.remove()
        return None
    if state is not None:
        state.config = config
        return state
    return _install(vae, config)


def remove_vae_tiling(pipe_or_vae) -> bool:
    """Undo `apply_vae`; True if a strategy was installed."""
    state = vae_state_of(pipe_or_vae)
    if state is None:
        return False
    state.remove()
    return True


def _install(vae, config: VaeConfig) -> VaeState:
    state = VaeState(vae=vae, config=config)
    for name in ("_decode", "_encode"):
        if name in vae.__dict__:
            state._shadowed[name] = vae.__dict__[name]
        state._originals[name] = getattr(vae, name)
    # methods bound to the state (which holds the VAE): a deepcopy of the VAE gets wrappers, state and originals
    # of its own, not ones that decode with this VAE's weights
    state._wrappers = {"_decode": types.MethodType(_decode, state), "_encode": types.MethodType(_encode, state)}
    for name, wrapper in state._wrappers.items():
        setattr(vae, name, wrapper)
    setattr(vae, _STATE_ATTR, state)
    return state


def _decode(state: VaeState, z: torch.Tensor, return_dict: bool = True):
    """AutoencoderKL._decode under apply_vae: tiled when the config says so for this size."""
    from diffusers.models.autoencoders.vae import DecoderOutput

    vae = state.vae
    _check_latents(vae, z)
    scale = vae_scale_factor(vae.config)
    if not state.tiles(z.shape[-2] * scale, z.shape[-1] * scale):
        state.untiled_decodes += state.active
        return state._originals["_decode"](z, return_dict=return_dict)
    sample = tiled_decode(vae, z, state.config.tile, state.config.overlap)  # [B, 3, H, W]
    state.tiled_decodes += 1
    return DecoderOutput(sample=sample) if return_dict else (sample,)


def _encode(state: VaeState, x: torch.Tensor) -> torch.Tensor:
    """AutoencoderKL._encode under apply_vae: the moments, tiled when the config says so for this size."""
    if not state.tiles(x.shape[-2], x.shape[-1]):
        state.untiled_encodes += state.active
        return state._originals["_encode"](x)
    state.tiled_encodes += 1
    return tiled_encode(state.vae, x, state.config.tile, state.config.overlap)  # [B, 2 C_latent, H/8, W/8]


# ----------------------------------------------------------------------------- peak memory by formula


class _Peak:
    """The largest live set seen so far (elements of one sample) and where it happened."""

    def __init__(self):
        self.elements = 0.0
        self.stage = ""

    def at(self, stage: str, elements: float) -> None:
        if elements > self.elements:
            self.elements, self.stage = elements, stage


def _resnet(peak: _Peak, name: str, c_in: int, c_out: int, pixels: int, held: float, ws: float) -> None:
    """ResnetBlock2D (no time embedding): live tensors at each op, with `held` alive outside the block.

    The input X stays alive throughout (the caller holds it). norm1 -> silu: X, its norm, the silu; conv1: X,
    silu, conv1 (+ workspace); conv2 likewise with C_out; end: X (+ the 1x1 shortcut of X), conv2, the sum and
    the quotient by output_scale_factor.
    """
    shortcut = int(c_in != c_out)
    peak.at(f"{name} norm1", held + RESNET_NORM_COPIES * c_in * pixels)
    peak.at(f"{name} conv1", held + (2 * c_in + c_out) * pixels + ws * (c_in + c_out) * pixels)
    peak.at(f"{name} conv2", held + (c_in + 2 * c_out) * pixels + ws * 2 * c_out * pixels)
    if shortcut:
        peak.at(f"{name} shortcut", held + (c_in + 2 * c_out) * pixels + ws * (c_in + c_out) * pixels)
    peak.at(f"{name} out", held + c_in * pixels + (RESNET_OUTPUT_COPIES + shortcut) * c_out * pixels)


def _attention(peak: _Peak, name: str, channels: int, tokens: int, held: float, score: float) -> None:
    """The mid-block's self-attention over all tokens (one head of `channels` in diffusers' VAE): its input,
    ATTENTION_TOKEN_COPIES of [tokens, channels] and, for an unfused SDPA, the [tokens, tokens] scores."""
    peak.at(name, held + (1 + ATTENTION_TOKEN_COPIES) * channels * tokens + score * tokens * tokens)


def _mid_block(peak: _Peak, config: Mapping, channels: int, pixels: int, held: float, ws: float, score: float):
    """UNetMidBlock2D: resnet, attention, resnet; the caller holds the block's input (`channels` x `pixels`)."""
    block_input = held + channels * pixels
    _resnet(peak, "mid resnet 0", channels, channels, pixels, held, ws)
    if config.get("mid_block_add_attention", True):
        _attention(peak, "mid attention", channels, pixels, block_input, score)
    _resnet(peak, "mid resnet 1", channels, channels, pixels, block_input, ws)


def _decoder_peak(config: Mapping, latent_h: int, latent_w: int, ws: float, score: float) -> _Peak:
    """Largest live set of one sample through diffusers' Decoder (+ post_quant_conv), in elements."""
    peak = _Peak()
    channels = list(reversed(config["block_out_channels"]))
    latent_c, out_c = config["latent_channels"], config["out_channels"]
    pixels = latent_h * latent_w
    held = 0.0  # the latents themselves are the caller's
    if config.get("use_post_quant_conv", True):
        peak.at("post_quant_conv", latent_c * pixels * (1 + 2 * ws))
        held = latent_c * pixels  # `z` in _decode
    peak.at("conv_in", held + channels[0] * pixels + ws * (latent_c + channels[0]) * pixels)
    _mid_block(peak, config, channels[0], pixels, held, ws, score)
    for index, c_out in enumerate(channels):
        block_in = channels[max(index - 1, 0)]
        for layer in range(config["layers_per_block"] + 1):
            c_in = block_in if layer == 0 else c_out
            # the Decoder holds the block's input while later resnets run
            _resnet(peak, f"up {index} resnet {layer}", c_in, c_out, pixels, held + (layer > 0) * block_in * pixels, ws)
        if index < len(channels) - 1:
            # Upsample2D: the Decoder holds the block input, the block its last resnet's output (X);
            # nearest 2x and the conv's output are at 4x the pixels
            before = held + (block_in + c_out) * pixels
            pixels *= 4
            peak.at(f"up {index} upsample", before + (UPSAMPLE_COPIES + 2 * ws) * c_out * pixels)
    last = channels[-1]
    peak.at("norm_out", held + 2 * last * pixels)
    peak.at("conv_out", held + (last + out_c) * pixels + ws * (last + out_c) * pixels)
    return peak


def _encoder_peak(config: Mapping, height: int, width: int, ws: float, score: float) -> _Peak:
    """Largest live set of one sample through diffusers' Encoder (+ quant_conv), in elements."""
    peak = _Peak()
    channels = list(config["block_out_channels"])
    in_c, moments_c = config["in_channels"], 2 * config["latent_channels"]
    pixels = height * width
    peak.at("conv_in", channels[0] * pixels + ws * (in_c + channels[0]) * pixels)
    for index, c_out in enumerate(channels):
        block_in = channels[max(index - 1, 0)]
        for layer in range(config["layers_per_block"]):
            c_in = block_in if layer == 0 else c_out
            _resnet(peak, f"down {index} resnet {layer}", c_in, c_out, pixels, (layer > 0) * block_in * pixels, ws)
        if index < len(channels) - 1:
            # Downsample2D: block input and X held, the zero-padded copy, the stride-2 conv's output
            before = (block_in + 2 * c_out) * pixels
            peak.at(f"down {index} downsample", before + c_out * pixels / 4 + ws * c_out * pixels * 5 / 4)
            pixels //= 4
    last = channels[-1]
    _mid_block(peak, config, last, pixels, 0.0, ws, score)
    peak.at("norm_out", 2 * last * pixels)
    peak.at("conv_out", (last + moments_c) * pixels + ws * (last + moments_c) * pixels)
    if config.get("use_quant_conv", True):
        peak.at("quant_conv", 2 * moments_c * pixels * (1 + ws))
    return peak


def _tiling_in_force(tiling: VaeConfig | None, height: int, width: int) -> bool:
    if tiling is None or tiling.tiling == "off":
        return False
    return tiling.tiling == "on" or height > tiling.tile or width > tiling.tile


def _tile_latent_shape(tiling: VaeConfig | None, latent_h: int, latent_w: int, scale: int) -> tuple | None:
    """The latent size of one tile when `tiling` splits this image into more than one tile, else None."""
    if not _tiling_in_force(tiling, latent_h * scale, latent_w * scale):
        return None
    rows = tile_spans(latent_h, tiling.tile // scale, tiling.overlap // scale)
    cols = tile_spans(latent_w, tiling.tile // scale, tiling.overlap // scale)
    if len(rows) == 1 and len(cols) == 1:
        return None
    return rows[0][1] - rows[0][0], cols[0][1] - cols[0][0]


def _coefficients(conv_workspace_copies: float | None, attention_score_copies: float | None) -> tuple:
    ws = CONV_WORKSPACE_COPIES if conv_workspace_copies is None else conv_workspace_copies
    score = ATTENTION_SCORE_COPIES if attention_score_copies is None else attention_score_copies
    return ws, score


def _check_size(height: int, width: int, scale: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < scale or value % scale:
            raise ConfigError(f"{name}={value!r} must be a positive multiple of the VAE's scale factor {scale}")


def decode_peak_bytes(
    vae_config: Mapping,
    height: int,
    width: int,
    batch: int = 1,
    dtype_bytes: int = 2,
    tiling: VaeConfig | None = None,
    *,
    conv_workspace_copies: float | None = None,
    attention_score_copies: float | None = None,
) -> int:
    """Device memory one VAE decode of a `batch` of height x width images adds on top of the weights and the
    latents: the largest set of tensors alive at once, in bytes. Feeds the memory planner.

    Derived from the decoder's architecture (block_out_channels, layers_per_block, latent/out channels, the
    mid-block attention) by walking diffusers' eager code and counting, at each op, the tensors still
    referenced (see `_resnet`, `_attention`, `_decoder_peak`):
    - the largest live sets are at full resolution, in the last up block and the upsampler before it. For FLUX
      (decoder channels 512, 512, 256, 128) without workspace it is the first 256->128 resnet, whose input,
      GroupNorm and SiLU outputs (RESNET_NORM_COPIES) are alive together: 768 channels of activations per
      output pixel, 6.0 GiB at 2048^2 in bf16, exactly what a live-tensor count on the CPU finds;
    - each convolution adds CONV_WORKSPACE_COPIES x (its input + output) of cuDNN workspace, which moves the
      peak to the last upsampler's conv: the block input held at 1/4 resolution (512 ch), the 256-channel
      nearest-2x copy, the conv's output and its workspace, 1216 channels per pixel: 9.5 GiB at 2048^2;
    - the mid-block attention at latent resolution: (1 + ATTENTION_TOKEN_COPIES) x tokens x channels, plus
      ATTENTION_SCORE_COPIES x tokens^2 (0 for the fused SDPA kernels; tokens^2 is 8 GiB at 2048^2 otherwise).
    Tiled (`tiling` in force for this size, as `apply_vae` decides): one tile's live set (tiles are all one
    size, see `tile_spans`), plus the output image kept across tiles (batch x out_channels x H x W in the
    output dtype); blending a tile needs its fp32 product with the weights (BLEND_FP32_BYTES per element),
    which is far below a tile's decoder peak.
    conv_workspace_copies / attention_score_copies override the module constants (0 / 0 match the CPU).
    """
    scale = vae_scale_factor(vae_config)
    _check_size(height, width, scale)
    ws, score = _coefficients(conv_workspace_copies, attention_score_copies)
    latent_h, latent_w = height // scale, width // scale
    tile = _tile_latent_shape(tiling, latent_h, latent_w, scale)
    if tile is not None:
        tile_h, tile_w = tile
        out_c = vae_config["out_channels"]
        tile_pixels = tile_h * tile_w * scale * scale
        decoder = _decoder_peak(vae_config, tile_h, tile_w, ws, score).elements * batch * dtype_bytes
        blend = batch * out_c * tile_pixels * (dtype_bytes + BLEND_FP32_BYTES) + tile_pixels * 4
        return int(batch * out_c * height * width * dtype_bytes + max(decoder, blend))
    return int(_decoder_peak(vae_config, latent_h, latent_w, ws, score).elements * batch * dtype_bytes)


def encode_peak_bytes(
    vae_config: Mapping,
    height: int,
    width: int,
    batch: int = 1,
    dtype_bytes: int = 2,
    tiling: VaeConfig | None = None,
    *,
    conv_workspace_copies: float | None = None,
    attention_score_copies: float | None = None,
) -> int:
    """Device memory one VAE encode of a `batch` of height x width images adds (bytes), as `decode_peak_bytes`
    counts it: the encoder's largest live set is in its first, full-resolution down block (3 + 1 copies of 128
    channels for FLUX, the block input held beside them) and its stride-2 downsample; tiled, one tile's
    plus the moments kept across tiles (batch x 2 latent_channels x H/8 x W/8).
    """
    scale = vae_scale_factor(vae_config)
    _check_size(height, width, scale)
    ws, score = _coefficients(conv_workspace_copies, attention_score_copies)
    tile = _tile_latent_shape(tiling, height // scale, width // scale, scale)
    if tile is not None:
        tile_h, tile_w = tile[0] * scale, tile[1] * scale
        moments_c = 2 * vae_config["latent_channels"]
        tile_latents = tile[0] * tile[1]
        encoder = _encoder_peak(vae_config, tile_h, tile_w, ws, score).elements * batch * dtype_bytes
        blend = batch * moments_c * tile_latents * (dtype_bytes + BLEND_FP32_BYTES) + tile_latents * 4
        moments = batch * moments_c * (height // scale) * (width // scale) * dtype_bytes
        return int(moments + max(encoder, blend))
    return int(_encoder_peak(vae_config, height, width, ws, score).elements * batch * dtype_bytes)


def decode_peak_stage(vae_config: Mapping, height: int, width: int, **coefficients) -> str:
    """Where the untiled decode's peak is (e.g. 'up 2 upsample'), for reports next to decode_peak_bytes."""
    scale = vae_scale_factor(vae_config)
    ws, score = _coefficients(coefficients.get("conv_workspace_copies"), coefficients.get("attention_score_copies"))
    return _decoder_peak(vae_config, height // scale, width // scale, ws, score).stage
