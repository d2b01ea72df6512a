"""Benchmark: where the fp8 activation-quantisation fusion gains or loses time (CUDA only).

    python -m benchmarks.bench_fp8_fusion --out benchmarks/results/fp8-fusion-<gpu>-<date>.json

1. Device time (CUDA graphs, inputs rotated out of L2, as kernels/bench_norm_ops.py) at FLUX's hidden size 3072 and
   L = 4608 / 16896 tokens of the kernels that make the fp8 projections' inputs: the norm kernels (bf16, with fp8
   outputs, and bf16 followed by the activation quantiser compiled by inductor: what a compiled block runs
   without the fusion), and gelu_concat_fp8 against inductor's GELU + concatenation + quantiser.
2. One synthetic flux-dev transformer forward at 1024^2 (the engine's fused blocks, SDPA, fp8 W8A8, regional
   compile): unfused, fused, fused + fast accumulation. ms/forward (CUDA events, median of --reps), the host's
   enqueue time per forward, ms/forward with Python's garbage collector off, and a torch.profiler table of the
   CUDA kernels (total device ms per kernel family and the top kernels by name).
The table is printed last; the JSON has every figure.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.bench_torchao import (
    compile_regionally,
    forward,
    free,
    make_inputs,
    synthetic_transformer,
    time_forward,
)
from benchmarks.kernels.bench_gelu_fp8 import SETS, gelu_rows, log, time_variant
from benchmarks.kernels.bench_norm_ops import HIDDEN, layernorm_cases
from engine.measure import environment_info

TOKENS = (4608, 16896)
FAMILIES = (  # kernel name fragments -> family, first match wins
    ("_layernorm_modulate_fwd", "norm kernels (ours)"),
    ("_gated_residual_layernorm", "norm kernels (ours)"),
    ("_qk_norm_rope", "qk_norm_rope (ours)"),
    ("flash", "attention"),
    ("fmha", "attention"),
    ("cudnn", "attention"),
    ("attention", "attention"),
    ("gemm", "GEMMs"),
    ("sm90", "GEMMs"),
    ("cutlass", "GEMMs"),
    ("f8f8bf16", "GEMMs"),
    ("_gelu_concat_fp8", "gelu_concat_fp8 (ours)"),
    ("triton_", "inductor-generated"),
)


def kernel_rows() -> list[dict]:
    from flux_kernels.fp8 import quantize_fp8_rowwise
    from flux_kernels.layernorm_modulate import (
        gated_residual_layernorm_modulate,
        gated_residual_layernorm_modulate_fp8,
        layernorm_modulate,
        layernorm_modulate_fp8,
    )

    @torch.compile(dynamic=False)
    def ln_then_quantize(x, shift, scale):
        return quantize_fp8_rowwise(layernorm_modulate(x, shift, scale))

    @torch.compile(dynamic=False)
    def gated_then_quantize(x, y, gate, shift, scale):
        residual, normed = gated_residual_layernorm_modulate(x, y, gate, shift, scale)
        return residual, *quantize_fp8_rowwise(normed)

    variants = {
        "layernorm_modulate": {
            "bf16 kernel": layernorm_modulate,
            "fp8 kernel (fused)": layernorm_modulate_fp8,
            "bf16 kernel + inductor quantiser": ln_then_quantize,
        },
        "gated_residual_layernorm_modulate": {
            "bf16 kernel": gated_residual_layernorm_modulate,
            "fp8 kernel (fused)": gated_residual_layernorm_modulate_fp8,
            "bf16 kernel + inductor quantiser": gated_then_quantize,
        },
    }
    rows = []
    for tokens in TOKENS:
        rows += gelu_rows(tokens)
        for case in layernorm_cases(tokens):
            inputs = [case["make_inputs"](seed) for seed in range(SETS)]
            for label, fn in variants[case["op"]].items():
                calls = [functools.partial(fn, **kwargs) for kwargs in inputs]
                rows.append(time_variant(case["op"], tokens, label, calls))
    return rows


# ----------------------------------------------------------------------------- 2. one transformer forward


def family(name: str) -> str:
    lowered = name.lower()
    return next((fam for fragment, fam in FAMILIES if fragment.lower() in lowered), "other")


def profile_forward(model, inputs: dict, forwards: int = 2) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(forwards):
            forward(model, inputs)
        torch.cuda.synchronize()
    by_name: dict[str, float] = collections.Counter()
    counts: dict[str, int] = collections.Counter()
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "self_cuda_time_total", 0.0)
        if device_us > 0:
            by_name[event.key] += device_us / forwards
            counts[event.key] += event.count // forwards
    families: dict[str, float] = collections.Counter()
    for name, us in by_name.items():
        families[family(name)] += us
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
    return {
        "device_ms_per_forward": round(sum(by_name.values()) / 1e3, 2),
        "families_ms": {fam: round(us / 1e3, 2) for fam, us in sorted(families.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": name[:120], "ms": round(us / 1e3, 3), "calls": counts[name]} for name, us in top],
    }


def cpu_submit_ms(model, inputs: dict, reps: int) -> float:
    """Median host time to enqueue one forward (the GPU idle before it, no sync after): when it nears the forward's
    device time, the step is bound by the CPU, not the GPU."""
    import statistics
    import time

    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        forward(model, inputs)
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def forward_rows(args) -> list[dict]:
    """One model, three settings in turn (each a recompile of the blocks): the activation quantisation unfused,
    fused, fused with fast accumulation. Per setting: ms/forward, the host's enqueue time, ms/forward with the
    Python garbage collector off, and the profiled kernel families."""
    import gc

    from engine.attention import apply_attention
    from engine.config import AttentionConfig, QuantConfig
    from engine.quant import quantize_model, set_fp8_options

    device = torch.device("cuda")
    rows = []
    model = synthetic_transformer("flux-dev", device)
    apply_attention(SimpleNamespace(transformer=model), AttentionConfig(backend="sdpa", fused_norms=True))
    quantize_model(model, "fp8", "transformer", record_sqnr=False)
    compile_regionally(model, "inductor")
    inputs = make_inputs(model.config, 4096, 512, device)
    for fused, fast_accum in ((False, False), (True, False), (True, True)):
        set_fp8_options(model, QuantConfig(transformer="fp8", fp8_fused_input=fused, fp8_fast_accum=fast_accum))
        times = time_forward(model, inputs, device, warmup=2, reps=args.reps)
        row = {"fp8_fused_input": fused, "fp8_fast_accum": fast_accum, "ms_per_forward": times["median"],
               "p20": times["p20"], "p80": times["p80"]}  # fmt: skip
        row["cpu_submit_ms"] = cpu_submit_ms(model, inputs, args.reps)
        gc.disable()
        try:
            row["ms_per_forward_gc_off"] = time_forward(model, inputs, device, warmup=1, reps=args.reps)["median"]
        finally:
            gc.enable()
        row.update(profile_forward(model, inputs))
        rows.append(row)
        log(f"  fused={fused} fast_accum={fast_accum}: {row['ms_per_forward']:.1f} ms/forward (p20 {row['p20']:.1f}, "
            f"p80 {row['p80']:.1f}; gc off {row['ms_per_forward_gc_off']:.1f}), host enqueue {row['cpu_submit_ms']:.1f}"
            f" ms, profiled device {row['device_ms_per_forward']} ms: {row['families_ms']}")  # fmt: skip
    del model, inputs
    free(device)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--skip-forward", action="store_true", help="only the kernel timings")
    parser.add_argument("--skip-kernels", action="store_true", help="only the transformer forward")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_fp8_fusion.py needs a CUDA GPU")
    result = {"environment": environment_info(torch.device("cuda")), "hidden": HIDDEN}
    result["kernels"] = []
    if not args.skip_kernels:
        log("kernels (device time, CUDA graphs):")
        result["kernels"] = kernel_rows()
    if not args.skip_forward:
        log("transformer forward at 1024^2 (fp8, fused blocks, regional compile):")
        result["forward"] = forward_rows(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    log(f"wrote {args.out}")
    log(f"\n{'op':36s} {'L':>6s} {'variant':34s} {'us':>8s}")
    for row in result["kernels"]:
        log(f"{row['op']:36s} {row['tokens']:6d} {row['variant']:34s} {row['us']:8.1f}")
    for row in result.get("forward", []):
        log(f"forward 1024^2 fused={row['fp8_fused_input']} fast_accum={row['fp8_fast_accum']}: "
            f"{row['ms_per_forward']:.1f} ms (gc off {row['ms_per_forward_gc_off']:.1f}), enqueue "
            f"{row['cpu_submit_ms']:.1f} ms, device {row['device_ms_per_forward']} ms, "
            f"families {row['families_ms']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
