"""What the CUDA driver compiles on a fresh machine: the first call of FLUX's fp8 GEMMs (torch._scaled_mm, row-wise
scales, fast accumulation, as the fp8 presets run them) and of SDPA at each token count, timed, with the CUDA JIT cache
(CUDA_CACHE_PATH) empty or filled, and the kernel names in the cache it leaves (NOTES 2026-12-01 08:16).

    CUDA_CACHE_PATH=/tmp/jit python -m benchmarks.jit_probe --out probe.json   # run twice: empty, then filled
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# (K, N) of the transformer's fp8 GEMMs: linear1 of a single block, its proj_out, a double block's qkv, attention
# output, MLP in and out
SHAPES = [(3072, 21504), (15360, 3072), (3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072)]
# tokens: text alone, 512^2, 768^2, 1360x768, 1024^2, Kontext 1024^2, 2048^2
TOKENS = [512, 1536, 2816, 4592, 4608, 8704, 16896]


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def cache_files(folder: Path) -> dict:
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    return {"files": len(files), "kib": sum(p.stat().st_size for p in files) // 1024}


def kernel_names(folder: Path, top: int = 40) -> dict[str, int]:
    """Kernel-like symbol names in the cache's files (a cubin keeps its kernels' mangled names), counted."""
    counts: dict[str, int] = {}
    for path in (p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []:
        for match in re.findall(rb"_Z[\w]{12,}|nvjet[\w]+|cutlass[\w]+|sm90[\w]+|triton[\w]+", path.read_bytes()):
            name = match.decode(errors="replace")[:120]
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:top])


def attention_rows(tokens_list: list[int], cache: Path) -> list[dict]:
    """First and second call of each attention function the engine's cores use (SDPA; cuDNN's fp8 SDPA where
    cudnn-frontend is installed) at each token count, FLUX's heads and layout, after engine.warmup's warm."""
    from engine.warmup import warm_call

    rows = []
    for core in ("sdpa", "cudnn-fp8"):
        try:
            call = warm_call(core)
            probe = torch.randn(1, 128, 24, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            call(probe, probe, probe)
        except Exception as err:  # noqa: BLE001 - a core this machine lacks is reported, not fatal
            rows.append({"op": core, "error": repr(err)[:200]})
            continue
        for tokens in tokens_list:
            q = torch.randn(1, tokens, 24, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)

            def attention(q=q, call=call):
                call(q, q, q)

            rows.append({"op": core, "tokens": tokens, "first_ms": round(timed(attention) * 1e3, 2),
                         "second_ms": round(timed(attention) * 1e3, 3), "cache": cache_files(cache)})  # fmt: skip
    return rows


def pipeline_parts_rows(cache: Path) -> list[dict]:
    """First and second call of the synthetic flux-dev pipeline's prompt encoding (CLIP and T5) and of its VAE decode
    at 1024^2: what the rest of a first call compiles at run time (the JIT cache's files before and after each)."""
    import diffusers

    from engine.models import synthetic_components

    pipe = diffusers.FluxPipeline(**synthetic_components("flux-dev", device="cuda", dtype=torch.bfloat16))
    latents = torch.randn(1, 16, 128, 128, device="cuda", dtype=torch.bfloat16)
    parts = {
        "encode_prompt": lambda: pipe.encode_prompt("a red fox in the snow", None, max_sequence_length=512),
        "vae.decode 1024^2": lambda: pipe.vae.decode(latents),
    }
    rows = []
    with torch.no_grad():
        for name, fn in parts.items():
            before = cache_files(cache)
            rows.append({"op": name, "cache_before": before, "first_ms": round(timed(fn) * 1e3, 2),
                         "second_ms": round(timed(fn) * 1e3, 3), "cache": cache_files(cache)})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--pipeline-parts",
        action="store_true",
        help="instead of the GEMM table: the prompt encoding's and the VAE decode's first calls",
    )
    parser.add_argument("--warm-tokens", type=int, nargs="*", default=None,
                        help="instead of the GEMM table: engine.warmup's warm, its time, then each core's first "
                             "call at these token counts")  # fmt: skip
    args = parser.parse_args()
    cache = Path(os.environ.get("CUDA_CACHE_PATH", Path.home() / ".nv" / "ComputeCache"))
    rows, before = [], cache_files(cache)
    torch.ones(1, device="cuda")  # the context
    if args.pipeline_parts:
        rows = pipeline_parts_rows(cache)
        args.out.write_text(json.dumps({"cache_path": str(cache), "rows": rows}, indent=1))
        for row in rows:
            print(row)
        return
    if args.warm_tokens is not None:
        from diffusers import FluxTransformer2DModel

        from engine.warmup import warm_attention

        with torch.device("meta"):
            model = FluxTransformer2DModel(num_layers=1, num_single_layers=0)  # dev's heads and head size
        model = model.to_empty(device="cuda").to(torch.bfloat16)
        for core in ("sdpa", "cudnn-fp8"):
            try:
                rows.append({"op": f"warm {core}", **(warm_attention(model, core) or {})})
            except Exception as err:  # noqa: BLE001
                rows.append({"op": f"warm {core}", "error": repr(err)[:200]})
        rows += attention_rows(args.warm_tokens, cache)
        result = {"cache_path": str(cache), "cache_before": before, "cache_after": cache_files(cache), "rows": rows}
        args.out.write_text(json.dumps(result, indent=1))
        for row in rows:
            print(row)
        return
    for tokens in TOKENS:
        for k, n in SHAPES:
            a = torch.randn(tokens, k, device="cuda").to(torch.float8_e4m3fn)
            b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
            sa, sb = torch.ones(tokens, 1, device="cuda"), torch.ones(1, n, device="cuda")

            def gemm(a=a, b=b, sa=sa, sb=sb):
                torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=True)

            rows.append({"op": f"scaled_mm K={k} N={n}", "tokens": tokens, "first_ms": round(timed(gemm) * 1e3, 2),
                         "second_ms": round(timed(gemm) * 1e3, 3), "cache": cache_files(cache)})  # fmt: skip
        q = torch.randn(1, 24, tokens, 128, device="cuda", dtype=torch.bfloat16)

        def sdpa(q=q):
            F.scaled_dot_product_attention(q, q, q)

        rows.append({"op": "sdpa", "tokens": tokens, "first_ms": round(timed(sdpa) * 1e3, 2),
                     "second_ms": round(timed(sdpa) * 1e3, 3), "cache": cache_files(cache)})  # fmt: skip
    result = {"cache_path": str(cache), "cache_before": before, "cache_after": cache_files(cache),
              "kernels_in_cache": kernel_names(cache), "rows": rows,
              "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name()}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1))
    slow = [r for r in rows if r["first_ms"] > 20]
    print(f"cache {before} -> {result['cache_after']}; first calls over 20 ms: {len(slow)} of {len(rows)}, "
          f"{sum(r['first_ms'] for r in slow):.0f} ms in all")  # fmt: skip
    for row in slow:
        first, then = row["first_ms"], row["second_ms"]
        print(f"  {row['op']:28s} tokens {row['tokens']:6d}: first {first:8.2f} ms, then {then} ms")
    for name, count in list(result["kernels_in_cache"].items())[:15]:
        print(f"  cache: {count:3d} {name}")


if __name__ == "__main__":
    main()
