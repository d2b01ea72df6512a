"""Where the VAE decode's GPU time goes: its largest kernels, eager and compiled as the engine compiles it
(engine.vae_compile), each as diffusers runs it and with the engine's VAE kernels (engine.vae_kernels: the attention
as GEMMs, the GroupNorms' split statistics; eagerly also the attention alone), PSNR against diffusers' eager decode
of the same latents; and the mid-block attention alone
(one head of 512 channels over every latent pixel: 65,536 tokens at 2048^2, 8.8 of the decoder's 48.5 TFLOP) under
each PyTorch SDPA backend that takes it.

    python -m benchmarks.profile_vae --res 2048 --out benchmarks/results/profile-vae-<gpu>-<date>.json

The flux-dev VAE with random weights (speed does not depend on the values), bf16, CUDA only (exits 2 without it).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from benchmarks.bench_vae import build_vae
from benchmarks.profiling import call_kernels
from engine.config import EngineConfig, VaeConfig
from engine.measure import environment_info, event_ms, psnr
from engine.memory.vae_peaks import vae_scale_factor
from engine.resolution import parse_resolution

TOP = 25


def top_kernels(decode, latents) -> list[tuple[float, int, str]]:
    """(ms, launches, name) of one decode's kernels, largest first, after a warm-up decode."""
    return [(round(ms, 3), count, name) for ms, count, name in call_kernels(lambda: decode(latents))]


def attention_rows(tokens: int, channels: int = 512) -> list[dict]:
    """The mid-block attention's shape [1, 1, tokens, channels] under each SDPA backend, and as two bf16 GEMMs
    around a softmax, query chunk by query chunk (bounded memory)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 1, tokens, channels, device="cuda", dtype=torch.bfloat16, generator=generator)
               for _ in range(3))  # fmt: skip
    flops = 4 * tokens * tokens * channels
    reference = None
    rows = []

    def chunked(chunk: int):
        def run():
            out = torch.empty_like(q)
            scale = channels**-0.5
            for start in range(0, tokens, chunk):
                scores = torch.matmul(q[:, :, start : start + chunk], k.transpose(-1, -2)) * scale
                out[:, :, start : start + chunk] = torch.matmul(scores.softmax(-1), v)
            return out

        return run

    variants = [(f"sdpa {backend.name}", backend) for backend in
                (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)]  # fmt: skip
    variants.append(("sdpa default", None))
    for label, backend in variants:
        row = {"op": label, "tokens": tokens, "channels": channels}
        try:
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                ms = event_ms(lambda: F.scaled_dot_product_attention(q, k, v))
                out = F.scaled_dot_product_attention(q, k, v).float()
        except Exception as err:  # noqa: BLE001 - a backend that refuses the shape: recorded
            row["error"] = f"{type(err).__name__}: {err}"[:200]
        else:
            reference = out if reference is None else reference
            row.update(ms=ms, tflops=flops / ms / 1e9, max_abs_diff=(out - reference).abs().max().item())
        rows.append(row)
    for chunk in (4096, 8192, 16384):
        row = {"op": f"bf16 GEMMs + softmax, {chunk}-query chunks", "tokens": tokens, "channels": channels}
        fn = chunked(min(chunk, tokens))
        ms = event_ms(fn)
        row.update(ms=ms, tflops=flops / ms / 1e9)
        if reference is not None:
            row["max_abs_diff"] = (fn().float() - reference).abs().max().item()
        rows.append(row)
    for row in rows:
        speed = f"{row['ms']:8.2f} ms {row['tflops']:5.0f} TFLOP/s" if "ms" in row else row["error"][:90]
        print(f"  attention L={tokens:6d} {row['op']:42s} {speed} diff {row.get('max_abs_diff', '-')}", flush=True)
    return rows


def attention_only(vae):
    """engine.vae_kernels' attention processor alone (GroupNorm as diffusers runs it) -> its undo."""
    from engine.vae_kernels import ChunkedAttnProcessor

    attentions = [m for m in vae.modules() if hasattr(m, "set_processor")]
    originals = [m.processor for m in attentions]
    for module, processor in zip(attentions, originals, strict=True):
        module.set_processor(ChunkedAttnProcessor(processor))

    def undo():
        for module, processor in zip(attentions, originals, strict=True):
            module.set_processor(processor)

    return undo


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--res", default="2048", help="comma-separated sizes: 1024 or WIDTHxHEIGHT")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-backends", action="store_true", help="skip the attention's SDPA backends alone")
    parser.add_argument("--eager-only", action="store_true", help="skip the compiled decodes (their compiles)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_vae: needs a CUDA GPU; nothing measured", file=sys.stderr)
        return 2
    from engine.bench.report import write_json
    from engine.compile import remove_compile
    from engine.vae_compile import compile_vae
    from engine.vae_kernels import apply_vae_kernels

    device, dtype = torch.device("cuda"), torch.bfloat16
    vae, vae_config = build_vae("flux-dev", device, dtype, 0)
    scale = vae_scale_factor(vae_config)
    sizes = [parse_resolution(text) for text in args.res.split(",")]
    result = {"env": environment_info(device), "sizes": sizes, "decode": [], "attention": []}

    def decode(latents):
        with torch.no_grad():
            return vae.decode(latents).sample

    latents = {size: torch.randn(1, vae_config["latent_channels"], size[0] // scale, size[1] // scale, device=device,
                                 dtype=dtype) for size in sizes}  # fmt: skip
    references = {size: decode(x).float().clamp(-1, 1) for size, x in latents.items()}
    # (label, engine kernels: none / the attention alone / all, compiled, channels_last weights with them)
    modes = [("eager", "none", False, False), ("eager", "attention", False, False), ("eager", "all", False, False),
             ("eager", "all", False, True), ("compiled (engine)", "none", True, True),
             ("compiled (engine)", "all", True, True)]  # fmt: skip
    for mode, engine_kernels, compiled, channels_last in [m for m in modes if not (args.eager_only and m[2])]:
        config = VaeConfig(compile=compiled, kernels=engine_kernels == "all")
        undo = apply_vae_kernels(SimpleNamespace(vae=vae), config, channels_last=channels_last)
        if engine_kernels == "attention":
            undo = attention_only(vae)
        mode = f"{mode}{', channels_last' if channels_last else ''}"
        state = compile_vae(SimpleNamespace(vae=vae), EngineConfig(vae=config), None) if compiled else None
        try:
            for (height, width), x in latents.items():
                ms = event_ms(lambda x=x: decode(x))
                quality = psnr(decode(x).float().clamp(-1, 1), references[(height, width)], data_range=2.0)
                top = top_kernels(decode, x)
                total = sum(k[0] for k in top)
                print(
                    f"{mode}, engine VAE kernels: {engine_kernels}, {width}x{height}: {ms:.1f} ms (kernels "
                    f"{total:.1f} ms), PSNR {quality:.1f} dB against diffusers' eager decode",
                    flush=True,
                )
                for kernel_ms, count, name in top[:TOP]:
                    print(f"  {kernel_ms:8.2f} ms {count:4d}x {name[:100]}", flush=True)
                row = {"mode": mode, "engine_kernels": engine_kernels, "height": height, "width": width, "ms": ms}
                result["decode"].append({**row, "psnr_db": quality, "kernel_ms": total, "top": top[:TOP]})
        finally:
            if state is not None:
                remove_compile(state)
            if undo is not None:
                undo()
    for height, width in [] if args.no_backends else sizes:
        result["attention"] += attention_rows((height // scale) * (width // scale))
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
