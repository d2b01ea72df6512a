"""Micro-benchmark: flux_kernels.fp8_lora_gemm (an fp8 projection with its LoRA updates in the epilogue) against what
the engine runs today beside an fp8 base (cuBLAS's _scaled_mm with fast accumulation, then one in-place addmm_ per
adapted part: engine.lora_update.lora_addmm_), at every projection shape of a FLUX.1-dev step, 1024^2 and 2048^2,
rank 64 on every part (the issue's synthetic adapter). Also both without an adapter (cuBLAS alone, the kernel alone):
what our GEMM costs against cuBLAS's where there is nothing to fuse.

    python -m benchmarks.kernels.bench_fp8_lora_gemm --out benchmarks/results/fp8-lora-gemm-<gpu>-<date>.json

Device time from CUDA graphs rotating over input sets (benchmarks.kernels.bench_norm_ops.gpu_ms); the A products
(`low`) are inputs here, the same on both sides. Per step: each shape's median x its count in a step (19 double
blocks with an image and a text stream, 38 single blocks). CUDA only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks.kernels.bench_norm_ops import gpu_ms
from engine.lora_update import lora_addmm_
from engine.measure import environment_info
from flux_kernels.fp8 import quantize_fp8_rowwise
from flux_kernels.fp8_lora_gemm import (
    fp8_lora_gemm_fwd,
    fp8_lora_gemm_ref,
    lora_columns,
    part_alignment,
    tuned_configs,
)

HIDDEN, MLP, TEXT_TOKENS, RANK = 3072, 12288, 512, 64
# (name, stream, K, part widths, count a step); the stream says which token count M is
PROJECTIONS = [
    ("double qkv", "image", HIDDEN, [HIDDEN] * 3, 19),
    ("double to_out", "image", HIDDEN, [HIDDEN], 19),
    ("double ff1", "image", HIDDEN, [MLP], 19),
    ("double ff2", "image", MLP, [HIDDEN], 19),
    ("double txt qkv", "text", HIDDEN, [HIDDEN] * 3, 19),
    ("double txt to_out", "text", HIDDEN, [HIDDEN], 19),
    ("double txt ff1", "text", HIDDEN, [MLP], 19),
    ("double txt ff2", "text", MLP, [HIDDEN], 19),
    ("single linear1", "joint", HIDDEN, [HIDDEN] * 3 + [MLP], 38),
    ("single proj_out", "joint", HIDDEN + MLP, [HIDDEN], 38),
]
SETS = 3


def log(*parts) -> None:
    print(*parts, flush=True)


def tokens(stream: str, res: int) -> int:
    image = (res // 16) ** 2
    return {"image": image, "text": TEXT_TOKENS, "joint": image + TEXT_TOKENS}[stream]


def make_set(m: int, k: int, widths: list[int], seed: int) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    n = sum(widths)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", generator=generator) * scale

    x_fp8, x_scale = quantize_fp8_rowwise(randn(m, k).bfloat16())
    w_fp8, w_scale = quantize_fp8_rowwise(randn(n, k, scale=k**-0.5).bfloat16())
    parts = len(widths)
    # low = scaling * A(x): of the update's size at 10% of the weights' RMS, as engine.bench's synthetic adapter
    low = randn(m, parts * RANK, scale=0.3).bfloat16()
    up = randn(n, RANK, scale=0.1 * k**-0.5).bfloat16()
    return {"x_fp8": x_fp8, "x_scale": x_scale.reshape(-1), "w_fp8": w_fp8, "w_scale": w_scale.reshape(-1),
            "bias": randn(n, scale=0.02).bfloat16(), "low": low, "up": up, "widths": widths,
            "low_col": lora_columns(widths, [RANK] * parts, RANK, "cuda")}  # fmt: skip


def cublas(s: dict) -> torch.Tensor:
    return torch._scaled_mm(s["x_fp8"], s["w_fp8"].t(), scale_a=s["x_scale"].view(-1, 1),
                            scale_b=s["w_scale"].view(1, -1), bias=s["bias"], out_dtype=torch.bfloat16,
                            use_fast_accum=True)  # fmt: skip


def cublas_addmm(s: dict) -> torch.Tensor:
    """The engine's path today: the base, then each part's B product accumulated in place."""
    out = cublas(s)
    start = 0
    for part, width in enumerate(s["widths"]):
        low = s["low"][:, part * RANK : (part + 1) * RANK]
        lora_addmm_(out, low, s["up"][start : start + width], start)
        start += width
    return out


def ours(s: dict, lora: bool, persistent: bool = False, prefetch: bool = False) -> torch.Tensor:
    extra = dict(low=s["low"], low_col=s["low_col"], up=s["up"], part_align=part_alignment(s["widths"]))
    return fp8_lora_gemm_fwd(
        s["x_fp8"], s["x_scale"], s["w_fp8"], s["w_scale"], s["bias"], **(extra if lora else {}), persistent=persistent,
        prefetch_lora=prefetch,
    )


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.float(), out.float()
    return float(20 * torch.log10(ref.norm() / (ref - out).norm().clamp_min(1e-30)))


def shape_row(name: str, stream: str, k: int, widths: list[int], count: int, res: int) -> dict:
    m, n = tokens(stream, res), sum(widths)
    sets = [make_set(m, k, widths, seed) for seed in range(SETS)]
    first = sets[0]
    reference = fp8_lora_gemm_ref(first["x_fp8"], first["x_scale"], first["w_fp8"], first["w_scale"], first["bias"],
                                  first["low"], first["low_col"], first["up"])  # fmt: skip
    fused, today = ours(first, True), cublas_addmm(first)
    row = {"name": name, "res": res, "M": m, "N": n, "K": k, "parts": len(widths), "rank": RANK, "count": count,
           "sqnr_ours_vs_cublas_addmm_db": sqnr_db(today, fused)}  # fmt: skip
    row["sqnr_ours_vs_fp32_db"] = sqnr_db(reference, fused)
    row["sqnr_cublas_addmm_vs_fp32_db"] = sqnr_db(reference, today)
    del fused, today, reference
    variants = {"cublas": cublas, "cublas_addmm": cublas_addmm, "ours": lambda s: ours(s, False),
                "ours_lora": lambda s: ours(s, True), "persistent": lambda s: ours(s, False, True),
                "persistent_lora": lambda s: ours(s, True, True),
                "ours_lora_prefetch": lambda s: ours(s, True, prefetch=True),
                "persistent_lora_prefetch": lambda s: ours(s, True, True, True)}  # fmt: skip
    flops = 2 * m * n * k
    for label, fn in variants.items():
        for s in sets:
            fn(s)  # autotunes outside the graph
        timing = gpu_ms([lambda s=s, fn=fn: fn(s) for s in sets])
        row[label] = {"ms": timing, "tflops": flops / (timing["median"] * 1e-3) / 1e12}
    row["lora_saving_ms"] = row["cublas_addmm"]["ms"]["median"] - row["ours_lora"]["ms"]["median"]
    log(
        f"{res:>5} {name:<18} M={m:<6} N={n:<6} K={k:<6} cublas {row['cublas']['ms']['median']:.3f} "
        f"+addmm {row['cublas_addmm']['ms']['median']:.3f} | ours {row['ours']['ms']['median']:.3f} "
        f"+lora {row['ours_lora']['ms']['median']:.3f} | persistent {row['persistent']['ms']['median']:.3f} "
        f"+lora {row['persistent_lora']['ms']['median']:.3f} | prefetched +lora "
        f"{row['ours_lora_prefetch']['ms']['median']:.3f} / {row['persistent_lora_prefetch']['ms']['median']:.3f} ms"
        f" | SQNR vs today "
        f"{row['sqnr_ours_vs_cublas_addmm_db']:.1f} dB"
    )
    return row


def per_step(rows: list[dict], res: int) -> dict:
    labels = ("cublas", "cublas_addmm", "ours", "ours_lora", "persistent", "persistent_lora", "ours_lora_prefetch",
              "persistent_lora_prefetch")
    return {label: sum(r[label]["ms"]["median"] * r["count"] for r in rows if r["res"] == res) for label in labels}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--res", type=int, nargs="+", default=[1024, 2048])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_fp8_lora_gemm needs a CUDA GPU")
    rows, totals = [], {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for res in args.res:  # the file rewritten after each size: a run cut short keeps what it measured
        rows += [shape_row(*projection, res) for projection in PROJECTIONS]
        totals[res] = per_step(rows, res)
        result = {"environment": environment_info(torch.device("cuda")), "rows": rows,
                  "per_step_ms": {str(r): t for r, t in totals.items()}, "chosen_configs": tuned_configs()}  # fmt: skip
        args.out.write_text(json.dumps(result, indent=1))
    log("\nper step (ms, each shape's median x its count):")
    log(f"{'res':>5} {'cuBLAS':>8} {'+addmm':>8} {'ours':>8} {'ours+LoRA':>10} {'persist':>8} {'persist+LoRA':>13}"
        f" {'prefetched: ours+LoRA':>22} {'persist+LoRA':>13}")  # fmt: skip
    for res, t in totals.items():
        log(
            f"{res:>5} {t['cublas']:8.2f} {t['cublas_addmm']:8.2f} {t['ours']:8.2f} {t['ours_lora']:10.2f} "
            f"{t['persistent']:8.2f} {t['persistent_lora']:13.2f} {t['ours_lora_prefetch']:22.2f} "
            f"{t['persistent_lora_prefetch']:13.2f}"
        )
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
