"""Micro-benchmark: the LoRA A products (`low`) of every adapted projection of a FLUX.1-dev step, rank 64 on every
part, 1024^2 and 2048^2: flux_kernels.lora_down (one kernel: A in bf16 on the e4m3 input, scaled and laid out as
`low`) against the path before it (A quantised to e4m3, cuBLAS's _scaled_mm, then the scaling and the bf16
rounding: engine.quant.fp8.fp8_input_linear then engine.lora_update.scaled), each compiled as the engine compiles
it (Inductor fuses the quantisation and the scaling around cuBLAS).

    python -m benchmarks.kernels.bench_lora_down --out benchmarks/results/lora-down-<gpu>-<date>.json

Device time from CUDA graphs rotating over input sets (benchmarks.kernels.bench_norm_ops.gpu_ms). Per step: each
shape's median x its count (benchmarks.kernels.bench_fp8_lora_gemm.PROJECTIONS). CUDA only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks.kernels.bench_fp8_lora_gemm import PROJECTIONS, RANK, SETS, log, sqnr_db, tokens
from benchmarks.kernels.bench_norm_ops import gpu_ms
from engine.lora_gemm import lora_down_op
from engine.measure import environment_info
from engine.quant.fp8 import fp8_input_linear
from flux_kernels.fp8 import quantize_fp8_rowwise
from flux_kernels.lora_down import lora_down_ref

SCALING = 1.0  # the synthetic adapter's alpha / r


def make_set(m: int, k: int, parts: int, seed: int) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    x_fp8, x_scale = quantize_fp8_rowwise(torch.randn(m, k, device="cuda", generator=generator).bfloat16())
    downs = [(torch.randn(RANK, k, device="cuda", generator=generator) * k**-0.5).bfloat16() for _ in range(parts)]
    return {"x_fp8": x_fp8, "x_scale": x_scale.reshape(-1, 1), "downs": downs}


def before(s: dict) -> torch.Tensor:
    """The path before lora_down: one fp8 GEMM over the parts' concatenated A, each adapter's columns scaled."""
    weight = torch.cat(s["downs"])
    hidden = fp8_input_linear(s["x_fp8"], s["x_scale"], weight, "scaled_mm", torch.bfloat16, True)
    return torch.cat([(low * SCALING).to(torch.bfloat16) for low in hidden.split(RANK, dim=-1)], dim=1)


def after(s: dict) -> torch.Tensor:
    """As engine.lora_gemm calls it: the parts' A concatenated, the scales a column each, the kernel as a custom op."""
    a = torch.cat(s["downs"])
    col_scale = torch.full((a.shape[0],), SCALING, device="cuda")
    return lora_down_op(s["x_fp8"], s["x_scale"].reshape(-1), a, col_scale)


def shape_row(name: str, stream: str, k: int, widths: list[int], count: int, res: int, compiled: dict) -> dict:
    m, parts = tokens(stream, res), len(widths)
    sets = [make_set(m, k, parts, seed) for seed in range(SETS)]
    first = sets[0]
    a = torch.cat(first["downs"])
    reference = lora_down_ref(first["x_fp8"], first["x_scale"], a, torch.full((a.shape[0],), SCALING, device="cuda"))
    row = {"name": name, "res": res, "M": m, "K": k, "C": parts * RANK, "count": count,
           "sqnr_before_vs_fp32_db": sqnr_db(reference, compiled["before"](first)),
           "sqnr_lora_down_vs_fp32_db": sqnr_db(reference, compiled["lora_down"](first))}  # fmt: skip
    for label, fn in compiled.items():
        for s in sets:
            fn(s)  # compiles outside the graph
        row[label] = {"ms": gpu_ms([lambda s=s, fn=fn: fn(s) for s in sets])}
    log(f"{res:>5} {name:<18} M={m:<6} C={parts * RANK:<4} K={k:<6} before {row['before']['ms']['median']:.4f} ms, "
        f"lora_down {row['lora_down']['ms']['median']:.4f} ms | SQNR vs fp32 {row['sqnr_before_vs_fp32_db']:.1f} / "
        f"{row['sqnr_lora_down_vs_fp32_db']:.1f} dB")  # fmt: skip
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--res", type=int, nargs="+", default=[1024, 2048])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_lora_down needs a CUDA GPU")
    torch._dynamo.config.recompile_limit = 64  # a graph per shape: 20 here
    compiled = {"before": torch.compile(before, dynamic=False), "lora_down": torch.compile(after, dynamic=False)}
    rows, totals = [], {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for res in args.res:  # the file rewritten after each size: a run cut short keeps what it measured
        rows += [shape_row(*projection, res, compiled) for projection in PROJECTIONS]
        totals[str(res)] = {label: sum(r[label]["ms"]["median"] * r["count"] for r in rows if r["res"] == res)
                            for label in compiled}  # fmt: skip
        result = {"environment": environment_info(torch.device("cuda")), "rows": rows, "per_step_ms": totals}
        args.out.write_text(json.dumps(result, indent=1))
    log("\nper step (ms, each shape's median x its count):")
    for res, t in totals.items():
        log(f"{res:>5} before {t['before']:.2f}  lora_down {t['lora_down']:.2f}")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
