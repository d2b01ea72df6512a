"""Micro-benchmark: the FLUX VAE decode, untiled vs diffusers' `enable_tiling()` vs `engine.vae.tiled_decode`.

    python -m benchmarks.bench_vae --res 1024,2048 --out benchmarks/results/

The real flux-dev VAE (AutoencoderKL, 16 latent channels, random weights: speed and memory do not depend on
the values), bf16 on CUDA, decoding random latents [B, 16, H/8, W/8]. Per resolution, one row each:
- untiled: `vae.decode` as FluxPipeline calls it (the reference of the PSNR column);
- diffusers-tiled: `vae.enable_tiling()` (1024-px tiles, 25% overlap, row-by-row Python blending); it only
  tiles above 1024 px. A first call slower than --diffusers-cap-s is reported alone (no repeats);
- tiled T/O: our `tiled_decode` for each --tiles entry (T = tile, O = overlap, image pixels);
- with --channels-last (default on CUDA): untiled and the 1024/128 tiling again, with the VAE's weights in
  channels_last: NHWC convolutions need no layout transposes, so their predicted GiB assume no conv workspace
  (if they measure near it, the CONV_WORKSPACE_COPIES hypothesis holds, and channels_last saves that memory).
Columns: ms (CUDA events after warm-up; median, p20, p80 of --runs), TFLOP/s (the decoder's FLOPs by torch's
flop counter on the meta device, summed over the tiles actually decoded), x untiled (time ratio), peak extra
GiB (torch.cuda.max_memory_allocated during one decode minus the allocation before it), predicted GiB
(engine.memory.vae_peaks.decode_peak_bytes, for calibrating its constants), PSNR dB vs untiled (outputs clamped to
[-1, 1], data range 2), tiles and tile size. Writes `vae-<gpu>-<YYYYMMDD-HHMM>.json` under --out with the GPU, versions,
commit and date. Needs CUDA for the real measurement: exits 2 without it, unless `--device cpu` (a debug run,
e.g. `--device cpu --variant tiny --res 128,192 --tiles 128/32`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
import time
from pathlib import Path

import torch

from engine.config import VaeConfig
from engine.measure import environment_info, psnr, quantiles, synchronize
from engine.memory.vae_peaks import (
    CONV_WORKSPACE_COPIES,
    decode_peak_bytes,
    decode_peak_stage,
    tile_spans,
    vae_scale_factor,
)
from engine.models import dtype_as_default, variant_spec
from engine.resolution import parse_resolution
from engine.vae import tiled_decode

GIB = 2**30
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CHANNELS_LAST_TILING = (1024, 128)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--res", default="1024,2048", help="comma-separated sizes: 1024 or WIDTHxHEIGHT (1360x768)")
    parser.add_argument("--tiles", default="512/64,768/96,1024/128,1152/128", help="comma-separated TILE/OVERLAP")
    parser.add_argument("--runs", type=int, default=3, help="timed decodes per row (median, p20, p80)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed decodes first")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--variant", default="flux-dev", help="model variant whose VAE to build (tiny for CPU debug)")
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a debug run)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--diffusers-cap-s", type=float, default=3.0, help="no repeats of a slower diffusers call")
    parser.add_argument("--no-diffusers", action="store_true", help="skip diffusers' enable_tiling() rows")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="also run with channels_last weights (default: on CUDA)")  # fmt: skip
    parser.add_argument("--compile", action="store_true",
                        help="also decode with the VAE compiled as the engine compiles it (engine.vae_compile), "
                             "every size in turn after one compile: first-call seconds, graphs made")  # fmt: skip
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    return parser


def parse_tilings(text: str) -> list[tuple[int, int]]:
    tilings = []
    for item in text.split(","):
        try:
            tile, overlap = (int(part) for part in item.strip().split("/"))
        except ValueError as err:
            raise SystemExit(f"error: --tiles entry {item!r} is not TILE/OVERLAP in pixels, e.g. 1024/128") from err
        VaeConfig(tiling="on", tile=tile, overlap=overlap)  # the engine's own validation and message
        tilings.append((tile, overlap))
    return tilings


def build_vae(variant: str, device: torch.device, dtype: torch.dtype, seed: int):
    """The variant's AutoencoderKL, random-init directly on `device` in `dtype` (as engine.models builds it)."""
    from diffusers import AutoencoderKL

    spec = variant_spec(variant)
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch.device(device), dtype_as_default(dtype):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**spec.vae)
    return vae.eval().requires_grad_(False), dict(spec.vae)


def decoder_flops(vae_config: dict, latent_h: int, latent_w: int, batch: int) -> int:
    """FLOPs of one decoder pass over [batch, C, latent_h, latent_w], counted on the meta device (no compute)."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKL(**vae_config)
        latents = torch.empty(batch, vae_config["latent_channels"], latent_h, latent_w)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.decoder(latents)
    return counter.get_total_flops()


def tiled_flops(vae_config: dict, latent_h: int, latent_w: int, batch: int, tile: int, overlap: int) -> int:
    scale = vae_scale_factor(vae_config)
    rows = tile_spans(latent_h, tile // scale, overlap // scale)
    cols = tile_spans(latent_w, tile // scale, overlap // scale)
    tile_h, tile_w = rows[0][1] - rows[0][0], cols[0][1] - cols[0][0]
    return len(rows) * len(cols) * decoder_flops(vae_config, tile_h, tile_w, batch)


def diffusers_tiles(vae, latent_h: int, latent_w: int) -> list[tuple[int, int]]:
    """The (h, w) of each tile diffusers' tiled_decode runs: from 0 in steps of 75% of a tile, the last ones
    cut short, never shifted back; one tile (untiled) unless the latents exceed tile_latent_min_size."""
    size = vae.tile_latent_min_size
    if latent_h <= size and latent_w <= size:
        return [(latent_h, latent_w)]
    stride = int(size * (1 - vae.tile_overlap_factor))
    return [(min(size, latent_h - top), min(size, latent_w - left))
            for top in range(0, latent_h, stride) for left in range(0, latent_w, stride)]  # fmt: skip


def measure(decode, device: torch.device, runs: int, warmup: int, cap_s: float | None = None) -> tuple[dict, object]:
    """Times `decode()` (CUDA events / perf_counter), then calls it once more for the peak extra memory.

    Returns the timings and the output of the last call. With `cap_s`, a first call slower than that is the
    only one (reported as such): diffusers' tiling may take tens of seconds.
    """
    from engine.measure import Timer

    if cap_s is not None:
        with Timer(device) as timer:
            output = decode()
        if timer.ms / 1e3 > cap_s:
            return {"ms": quantiles([timer.ms]), "times_ms": [timer.ms], "note": "one cold call (over the cap)"}, output
        del output
    for _ in range(warmup):
        decode()
    times: list[float] = []
    for _ in range(runs):
        with Timer(device) as timer:
            decode()
        times.append(timer.ms)
    result = {"ms": quantiles(times), "times_ms": times}
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    output = decode()
    if device.type == "cuda":
        synchronize(device)
        result["peak_extra_gib"] = (torch.cuda.max_memory_allocated(device) - before) / GIB
    return result, output


def tile_grid(latent_h: int, latent_w: int, tile: int, overlap: int, scale: int) -> tuple[int, str]:
    """Our tiling's tile count and tile size (WxH pixels)."""
    rows = tile_spans(latent_h, tile // scale, overlap // scale)
    cols = tile_spans(latent_w, tile // scale, overlap // scale)
    return len(rows) * len(cols), f"{(cols[0][1] - cols[0][0]) * scale}x{(rows[0][1] - rows[0][0]) * scale}"


def run_resolution(args, vae, vae_config, device, dtype, height: int, width: int, tilings) -> list[dict]:
    scale = vae_scale_factor(vae_config)
    latent_h, latent_w = height // scale, width // scale
    generator = torch.Generator(device=device).manual_seed(args.seed)
    latents = torch.randn(args.batch, vae_config["latent_channels"], latent_h, latent_w, generator=generator,
                          device=device, dtype=dtype)  # fmt: skip
    base = {"height": height, "width": width, "batch": args.batch, "dtype": str(dtype).removeprefix("torch.")}
    untiled_flops = decoder_flops(vae_config, latent_h, latent_w, args.batch)
    rows = []
    reference = untiled_ms = None

    def row(config: str, decode, flops: int, predicted: int | None, tiles: int, tile_px: str, **extra) -> dict:
        """Measure one config and print its line; a failure (out of memory, an unsupported kernel) is recorded
        in its row and the run goes on."""
        nonlocal reference, untiled_ms
        cap_s = extra.pop("cap_s", None)
        entry = {**base, "config": config, "flops": flops, "tiles": tiles, "tile_px": tile_px, **extra}
        entry["predicted_gib"] = None if predicted is None else predicted / GIB
        try:
            with torch.no_grad():
                result, output = measure(decode, device, args.runs, args.warmup, cap_s)
        except (RuntimeError, ValueError) as err:  # torch.OutOfMemoryError is a RuntimeError
            entry["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            rows.append(entry)
            print(f"{entry['width']}x{entry['height']} {config}: failed: {entry['error']}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return entry
        image = output.float().clamp(-1, 1)  # [B, 3, H, W]
        del output
        ms = result["ms"]["median"]
        if config == "untiled":
            reference, untiled_ms = image, ms
        entry.update(result)
        entry["tflops"] = flops / (ms * 1e-3) / 1e12
        entry["psnr_db"] = None if reference is None else psnr(image, reference, data_range=2.0)
        entry["x_untiled"] = None if untiled_ms is None else ms / untiled_ms
        rows.append(entry)
        print(format_row(entry), flush=True)
        return entry

    untiled_predicted = decode_peak_bytes(vae_config, height, width, args.batch, dtype.itemsize)
    row("untiled", lambda: vae.decode(latents).sample, untiled_flops, untiled_predicted, 1, f"{width}x{height}",
        peak_stage=decode_peak_stage(vae_config, height, width))  # fmt: skip
    if not args.no_diffusers:
        vae.enable_tiling()
        try:
            shapes = diffusers_tiles(vae, latent_h, latent_w)
            flops = sum(decoder_flops(vae_config, h, w, args.batch) for h, w in shapes)
            note = "" if len(shapes) > 1 else "diffusers does not tile at this size"
            row("diffusers-tiled", lambda: vae.decode(latents).sample, flops, None, len(shapes),
                f"{vae.tile_sample_min_size}", cap_s=args.diffusers_cap_s, note_size=note,
                vae_device=str(next(vae.parameters()).device))  # fmt: skip
        finally:
            vae.disable_tiling()
    for tile, overlap in tilings:
        config = VaeConfig(tiling="on", tile=tile, overlap=overlap)
        row(f"tiled {tile}/{overlap}", lambda t=tile, o=overlap: tiled_decode(vae, latents, t, o),
            tiled_flops(vae_config, latent_h, latent_w, args.batch, tile, overlap),
            decode_peak_bytes(vae_config, height, width, args.batch, dtype.itemsize, config),
            *tile_grid(latent_h, latent_w, tile, overlap, scale))  # fmt: skip
    if args.channels_last:
        vae.to(memory_format=torch.channels_last)
        try:
            # predicted without conv workspace: NHWC convolutions need no layout transposes (the hypothesis
            # behind CONV_WORKSPACE_COPIES, tested by these rows)
            row("untiled channels_last", lambda: vae.decode(latents).sample, untiled_flops,
                decode_peak_bytes(vae_config, height, width, args.batch, dtype.itemsize, conv_workspace_copies=0),
                1, f"{width}x{height}")  # fmt: skip
            tile, overlap = CHANNELS_LAST_TILING
            config = VaeConfig(tiling="on", tile=tile, overlap=overlap)
            row(f"tiled {tile}/{overlap} channels_last", lambda: tiled_decode(vae, latents, tile, overlap),
                tiled_flops(vae_config, latent_h, latent_w, args.batch, tile, overlap),
                decode_peak_bytes(vae_config, height, width, args.batch, dtype.itemsize, config,
                                  conv_workspace_copies=0),
                *tile_grid(latent_h, latent_w, tile, overlap, scale))  # fmt: skip
        finally:
            vae.to(memory_format=torch.contiguous_format)
    return rows


def compiled_rows(args, vae, vae_config: dict, device: torch.device, dtype: torch.dtype, sizes) -> list[dict]:
    """The untiled decode with the VAE compiled as the engine compiles it (engine.vae_compile: dynamic sizes,
    channels_last), once for every size in turn: each size's first call (the first: the compile; a later one: a
    recompile, if any), its timed calls, and its PSNR against the eager decode of the same latents."""
    from types import SimpleNamespace

    from engine.config import EngineConfig
    from engine.vae_compile import compile_vae

    scale = vae_scale_factor(vae_config)
    cases = []
    for height, width in sizes:
        generator = torch.Generator(device=device).manual_seed(args.seed)
        latents = torch.randn(args.batch, vae_config["latent_channels"], height // scale, width // scale,
                              generator=generator, device=device, dtype=dtype)  # fmt: skip
        with torch.no_grad():
            reference = vae.decode(latents).sample.float().clamp(-1, 1)
        cases.append((height, width, latents, reference))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    state = compile_vae(SimpleNamespace(vae=vae), EngineConfig(vae=VaeConfig(compile=True)), None)
    rows = []
    try:
        for height, width, latents, reference in cases:
            started = time.perf_counter()
            with torch.no_grad():
                vae.decode(latents)
            synchronize(device)
            first_s = time.perf_counter() - started
            with torch.no_grad():
                result, output = measure(lambda x=latents: vae.decode(x).sample, device, args.runs, args.warmup)
            ms = result["ms"]["median"]
            flops = decoder_flops(vae_config, *latents.shape[-2:], args.batch)
            entry = {"height": height, "width": width, "batch": args.batch, "dtype": str(dtype).removeprefix("torch."),
                     "config": "untiled compiled (engine)", "flops": flops, "tiles": 1, "tile_px": f"{width}x{height}",
                     "predicted_gib": None, **result, "tflops": flops / (ms * 1e-3) / 1e12,
                     "psnr_db": psnr(output.float().clamp(-1, 1), reference, data_range=2.0), "x_untiled": None,
                     "first_call_s": first_s, "graphs_so_far": counters["stats"]["unique_graphs"]}  # fmt: skip
            entry["note"] = f"first call {first_s:.1f} s, {entry['graphs_so_far']} graph(s) so far"
            rows.append(entry)
            print(format_row(entry), flush=True)
    finally:
        from engine.compile import remove_compile

        remove_compile(state)
    return rows


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


COLUMNS = (
    ("res", 11, lambda r: f"{r['width']}x{r['height']}"),
    ("config", 30, lambda r: r["config"]),
    ("ms", 10, lambda r: _fmt(r["ms"]["median"], ".1f")),
    ("p20-p80 ms", 15, lambda r: f"{r['ms']['p20']:.1f}-{r['ms']['p80']:.1f}"),
    ("TFLOP/s", 8, lambda r: _fmt(r["tflops"], ".1f") if r["flops"] else "-"),
    ("x untiled", 9, lambda r: _fmt(r["x_untiled"], ".2f")),
    ("peak GiB", 9, lambda r: _fmt(r.get("peak_extra_gib"), ".2f")),
    ("pred GiB", 9, lambda r: _fmt(r["predicted_gib"], ".2f")),
    ("PSNR dB", 8, lambda r: _fmt(r["psnr_db"], ".1f")),
    ("tiles", 6, lambda r: str(r["tiles"] or "-")),
    ("tile px", 10, lambda r: r["tile_px"] or "-"),
    ("note", 0, lambda r: " ".join(filter(None, (r.get("note"), r.get("note_size"))))),
)


def format_header() -> str:
    return " ".join(name.ljust(width) for name, width, _ in COLUMNS)


def format_row(entry: dict) -> str:
    return " ".join(cell(entry).ljust(width) for _, width, cell in COLUMNS)


def card_slug(env: dict) -> str:
    """The card's name for file names, by the rule of engine.bench.report.default_out_path."""
    card = (env.get("gpu") or "cpu").lower().replace("nvidia ", "").replace(" ", "-")
    return "".join(c for c in card if c.isalnum() or c in "-_.")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_vae: no CUDA GPU here; it measures GPU time and memory. For a CPU debug run pass "
              "--device cpu --variant tiny --res 128,192 --tiles 128/32", file=sys.stderr)  # fmt: skip
        return 2
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    sizes = [parse_resolution(text) for text in args.res.split(",")]
    tilings = parse_tilings(args.tiles)
    started = time.perf_counter()
    vae, vae_config = build_vae(args.variant, device, dtype, args.seed)
    env = environment_info(device)
    print(f"# {env['gpu'] or env['cpu']}, torch {env['torch']}, diffusers {env['diffusers']}, commit {env['commit']}; "
          f"{args.variant} VAE, {dtype}, batch {args.batch}", flush=True)  # fmt: skip
    print(format_header(), flush=True)
    rows = []
    for height, width in sizes:
        rows += run_resolution(args, vae, vae_config, device, dtype, height, width, tilings)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.compile:
        rows += compiled_rows(args, vae, vae_config, device, dtype, sizes)
    payload = {
        "benchmark": "vae-decode",
        "env": env,
        "variant": args.variant,
        "args": vars(args),
        "constants": {"CONV_WORKSPACE_COPIES": CONV_WORKSPACE_COPIES},
        "wall_s": time.perf_counter() - started,
        "rows": rows,
    }
    from engine.bench.report import write_json

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M")
    path = Path(args.out) / f"vae-{card_slug(env)}-{stamp}.json"
    write_json(path, payload)
    print(f"# wrote {path} ({payload['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
