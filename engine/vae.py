"""A fast tiled VAE decode (and encode) for FLUX (its peak memory by formula: engine/memory/vae_peaks.py).

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

import functools
import types
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import VaeConfig
from .errors import ConfigError, InputError
from .memory.vae_peaks import check_tiling_args, tile_spans, vae_scale_factor

_STATE_ATTR = "_flux_engine_vae_state"


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


def _tiles_of_all_ranks(run_tile, spans: list[tuple[int, int, int, int]], world) -> list[torch.Tensor]:
    """run_tile on every span, shared by the ranks of `world` (engine.parallel.runtime.World): rank r runs spans r,
    r + size, ...; the results (all of one shape: the spans are of one size) are all-gathered, in span order. A rank
    without a span of its own (fewer tiles than ranks) runs the first one again, so every rank sends as many."""
    import torch.distributed as dist

    per_rank = -(-len(spans) // world.size)
    mine = spans[world.rank :: world.size] or spans[:1]
    # [k, B, C, th, tw]; contiguous for all_gather (a channels_last VAE, engine.vae_kernels, decodes NHWC tiles)
    stacked = torch.stack([run_tile(*span) for span in mine]).contiguous()
    if stacked.shape[0] < per_rank:
        stacked = torch.cat([stacked, stacked.new_zeros(per_rank - stacked.shape[0], *stacked.shape[1:])])
    gathered = [torch.empty_like(stacked) for _ in range(world.size)]
    dist.all_gather(gathered, stacked)
    return [gathered[index % world.size][index // world.size] for index in range(len(spans))]


def _blend_tiles(
    run_tile, grid: tuple[int, int], tile: int, overlap: int, out_scale: int, device: torch.device, world=None
) -> torch.Tensor:
    """Run `run_tile(top, bottom, left, right)` on overlapping tiles of a latent grid of `grid` = (h, w) and blend
    its results ([B, C, th*out_scale, tw*out_scale]) into one [B, C, h*out_scale, w*out_scale] tensor of the
    results' dtype.

    tile and overlap are in latents; ramps are `overlap * out_scale` output positions long. world (context
    parallelism): the tiles are shared by its ranks and all-gathered; every rank blends the whole result.
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
    shared = None
    if world is not None and world.size > 1:
        shared = iter(_tiles_of_all_ranks(run_tile, [(*row, *col) for row in rows for col in cols], world))
    out = None
    for (top, bottom), (out_top, out_bottom), row_weight in zip(rows, out_rows, row_weights, strict=True):
        for (left, right), (out_left, out_right), col_weight in zip(cols, out_cols, col_weights, strict=True):
            result = next(shared) if shared is not None else run_tile(top, bottom, left, right)  # [B, C, th, tw]
            if out is None:
                batch, channels = result.shape[:2]
                out = result.new_zeros(batch, channels, out_rows[-1][1], out_cols[-1][1])  # [B, C, H, W]
            # weight [th, tw] and the product in fp32, on the tile only; the in-place add computes in fp32 and
            # rounds into `out` once per tile that covers a pixel (1 inside a tile, 2-4 in the seams). Nothing of
            # this tile outlives the statement, so the next tile's decode starts from `out` alone.
            out[:, :, out_top:out_bottom, out_left:out_right].add_(result * (row_weight[:, None] * col_weight))
            del result
    return out


def tiled_decode(vae, latents: torch.Tensor, tile: int = 1024, overlap: int = 128, world=None) -> torch.Tensor:
    """Decode `latents` [B, C_latent, h, w] in overlapping tiles: the image [B, 3, 8h, 8w], as vae.decode's sample.

    tile, overlap: image pixels (multiples of the scale factor 8; overlap < tile / 2). An image no larger than
    one tile is decoded in one piece, identical to the untiled decode. Each tile decodes the whole batch, so
    sample b of a batch equals decoding sample b alone. world (engine.parallel): the tiles are shared by its ranks.
    """
    scale = vae_scale_factor(vae.config)
    check_tiling_args(tile, overlap, scale)
    _check_latents(vae, latents)

    def decode_tile(top: int, bottom: int, left: int, right: int) -> torch.Tensor:
        z = latents[:, :, top:bottom, left:right]  # [B, C_latent, th, tw], a view
        if vae.post_quant_conv is not None:  # 1x1: per tile is exact
            z = vae.post_quant_conv(z)
        return vae.decoder(z)  # [B, 3, 8 th, 8 tw]

    grid = latents.shape[-2:]
    return _blend_tiles(decode_tile, grid, tile // scale, overlap // scale, scale, latents.device, world)


def tiled_encode(vae, images: torch.Tensor, tile: int = 1024, overlap: int = 128) -> torch.Tensor:
    """Encode `images` [B, 3, H, W] in overlapping tiles: the moments [B, 2*C_latent, H/8, W/8] (mean and
    log-variance, what `DiagonalGaussianDistribution` takes), as `vae._encode` returns them.

    tile, overlap: image pixels, as in `tiled_decode`; the blend ramps are overlap/8 latents long. Tiles are laid
    out on the latent grid, so every image tile is a multiple of the scale factor (H and W must be too).
    """
    scale = vae_scale_factor(vae.config)
    check_tiling_args(tile, overlap, scale)
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
    switched: bool = False  # diffusers' enable_tiling / disable_tiling called since: diffusers decides (`_switch`)
    world: Any = None  # context parallelism (engine.parallel.apply): tiled decodes are shared by its ranks
    _originals: dict = field(default_factory=dict, repr=False)  # name -> the callable the wrapper falls back to
    _shadowed: dict = field(default_factory=dict, repr=False)  # name -> an instance attribute we replaced
    _wrappers: dict = field(default_factory=dict, repr=False)

    def tiles(self, height: int, width: int) -> bool:
        """Whether an image of height x width pixels is decoded (encoded) in tiles under `config`."""
        if not self.active or self.config.tiling == "off" or self.switched:
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
        state.config, state.switched = config, False
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
    for name in _WRAPPED:
        if name in vae.__dict__:
            state._shadowed[name] = vae.__dict__[name]
        state._originals[name] = getattr(vae, name)
    # methods bound to the state (which holds the VAE): a deepcopy of the VAE gets wrappers, state and originals
    # of its own, not ones that decode with this VAE's weights
    state._wrappers = {"_decode": types.MethodType(_decode, state), "_encode": types.MethodType(_encode, state)}
    for name in _WRAPPED[2:]:
        state._wrappers[name] = types.MethodType(functools.partial(_switch, name=name), state)
    for name, wrapper in state._wrappers.items():
        setattr(vae, name, wrapper)
    setattr(vae, _STATE_ATTR, state)
    return state


_WRAPPED = ("_decode", "_encode", "enable_tiling", "disable_tiling")


def _switch(state: VaeState, *args, name: str, **kwargs):
    """diffusers' enable_tiling / disable_tiling on a VAE under apply_vae: from then on diffusers decides, with its
    own tiles or none, as without the engine's tiling (before, the switch was ignored: the engine's tiles, 30 dB from
    diffusers' image with enable_tiling, and tiles after disable_tiling). apply_vae called again (or restore, then
    optimize) gives the engine's tiling back."""
    result = state._originals[name](*args, **kwargs)
    state.switched = state.switched or state.active
    return result


def _decode(state: VaeState, z: torch.Tensor, return_dict: bool = True):
    """AutoencoderKL._decode under apply_vae: tiled when the config says so for this size."""
    from diffusers.models.autoencoders.vae import DecoderOutput

    vae = state.vae
    _check_latents(vae, z)
    scale = vae_scale_factor(vae.config)
    if not state.tiles(z.shape[-2] * scale, z.shape[-1] * scale):
        state.untiled_decodes += state.active
        return state._originals["_decode"](z, return_dict=return_dict)
    sample = tiled_decode(vae, z, state.config.tile, state.config.overlap, state.world)  # [B, 3, H, W]
    state.tiled_decodes += 1
    return DecoderOutput(sample=sample) if return_dict else (sample,)


def _encode(state: VaeState, x: torch.Tensor) -> torch.Tensor:
    """AutoencoderKL._encode under apply_vae: the moments, tiled when the config says so for this size."""
    if not state.tiles(x.shape[-2], x.shape[-1]):
        state.untiled_encodes += state.active
        return state._originals["_encode"](x)
    state.tiled_encodes += 1
    return tiled_encode(state.vae, x, state.config.tile, state.config.overlap)  # [B, 2 C_latent, H/8, W/8]
