"""The VAE's peak memory by formula: decode and encode, untiled or tiled, per stage of the network (the planner's
VAE figures; engine/vae.py holds the tiled decode itself). No module is built and no tensor allocated here."""

from __future__ import annotations

import math
from collections.abc import Mapping

from ..config import VaeConfig
from ..errors import ConfigError

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


def check_tiling_args(tile: int, overlap: int, scale: int) -> None:
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


def tiling_in_force(tiling: VaeConfig | None, height: int, width: int) -> bool:
    if tiling is None or tiling.tiling == "off":
        return False
    return tiling.tiling == "on" or height > tiling.tile or width > tiling.tile


def _tile_latent_shape(tiling: VaeConfig | None, latent_h: int, latent_w: int, scale: int) -> tuple | None:
    """The latent size of one tile when `tiling` splits this image into more than one tile, else None."""
    if not tiling_in_force(tiling, latent_h * scale, latent_w * scale):
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
