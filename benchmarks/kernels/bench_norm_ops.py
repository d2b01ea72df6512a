"""Micro-benchmark: the row-wise norm kernels (kernels/qk_norm_rope.py, kernels/layernorm_modulate.py) against
their eager PyTorch references and torch.compile of those references, at FLUX shapes, in GB/s and as a share of the
card's copy ceiling.

    python -m benchmarks.kernels.bench_norm_ops --out benchmarks/results/norm-<gpu>-<date>.json

One script for both kernel modules, not one per op: the three ops share one run's copy ceiling (their % of copy is
read against it) and one result file, norm-*.json, which benchmarks/make_readme_table.py and the recorded results
read as one table; split, each op would measure its own ceiling and write its own file.

qk_norm_rope: B=1, H=24, D=128, L_txt=512, L_img=1024 / 4096 / 16384 (double-stream layout).
layernorm_modulate, gated_residual_layernorm_modulate: (1, L, 3072), L = 4608 / 16896.

Two times per implementation, both as median, p20, p80:
- eager: triton.testing.do_bench of the Python call (L2 flushed between runs): what an eager caller waits,
  launch overhead included when it exceeds the flush kernel's run time.
- host_us: the CPU time of one call (200 back-to-back calls without a sync), the launch overhead itself.
- gpu: triton.testing.do_bench_cudagraph of the same call (one warm-up call first: autotuning cannot run in a
  graph), rotating over several input sets and keeping the last outputs alive, so that no call finds its
  inputs or output buffer in L2: the kernel's own device time.
GB/s counts the bytes a fused kernel must move (inputs read once, outputs written once) over the gpu time;
the copy ceiling is a ~1 GiB device-to-device copy measured in the same run, 2 * bytes / time. A copy of
the same bytes at each shape ("torch copy_ (same bytes)") shows what that size allows. Needs CUDA: exits 2
without it.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import sys
from pathlib import Path

import torch

from engine.measure import do_bench_ms, environment_info, host_us_per_call, quantiles
from flux_kernels.layernorm_modulate import (
    gated_residual_layernorm_modulate,
    gated_residual_layernorm_modulate_ref,
    layernorm_modulate,
    layernorm_modulate_ref,
)
from flux_kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref

HEADS, HEAD_DIM, HIDDEN, TEXT_TOKENS = 24, 128, 3072, 512
QK_IMAGE_TOKENS = (1024, 4096, 16384)
LAYERNORM_TOKENS = (4608, 16896)
COPY_BYTES = 2**30
ROTATION_BYTES = 256 * 2**20  # input sets rotated through in the gpu timing: ~5x the H100's 50 MB L2


def gpu_ms(fn_per_set: list) -> dict:
    """Device time of one call, from a CUDA graph of many calls that rotate over the input sets."""
    import triton.testing

    sets = itertools.cycle(fn_per_set)
    alive = collections.deque(maxlen=len(fn_per_set))  # outputs stay allocated: no buffer reuse while in L2

    def call():
        alive.append(next(sets)())

    times = triton.testing.do_bench_cudagraph(call, return_mode="all")
    alive.clear()
    return quantiles(list(times))


def copy_ceiling() -> dict:
    src = torch.empty(COPY_BYTES // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    timing = do_bench_ms(lambda: dst.copy_(src))
    return {"bytes": COPY_BYTES, "ms": timing, "gbps": 2 * COPY_BYTES / (timing["median"] * 1e-3) / 1e9}


def qk_norm_rope_case(image_tokens: int) -> dict:
    width = 3 * HEADS * HEAD_DIM
    total = TEXT_TOKENS + image_tokens

    def make_inputs(seed: int) -> dict:
        generator = torch.Generator(device="cuda").manual_seed(seed)

        def randn(*shape, dtype=torch.bfloat16):
            return torch.randn(*shape, device="cuda", dtype=dtype, generator=generator)

        return dict(
            qkv=randn(1, image_tokens, width), q_weight=randn(HEAD_DIM), k_weight=randn(HEAD_DIM),
            cos=randn(total, HEAD_DIM, dtype=torch.float32), sin=randn(total, HEAD_DIM, dtype=torch.float32),
            heads=HEADS, txt_qkv=randn(1, TEXT_TOKENS, width), txt_q_weight=randn(HEAD_DIM),
            txt_k_weight=randn(HEAD_DIM),
        )  # fmt: skip

    # read: qkv and txt_qkv (bf16), cos and sin (fp32); written: q, k, v (bf16)
    moved = total * width * 2 + 2 * total * HEAD_DIM * 4 + 3 * total * HEADS * HEAD_DIM * 2
    shape = f"L_txt={TEXT_TOKENS} L_img={image_tokens} H={HEADS} D={HEAD_DIM}"
    return dict(op="qk_norm_rope", shape=shape, bytes=moved, make_inputs=make_inputs, kernel=qk_norm_rope,
                reference=qk_norm_rope_ref)  # fmt: skip


def layernorm_cases(tokens: int) -> list[dict]:
    def make_inputs(seed: int) -> dict:
        generator = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(1, tokens, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=generator)
        y = torch.randn(1, tokens, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=generator)
        embedding = torch.randn(1, 6 * HIDDEN, device="cuda", dtype=torch.bfloat16, generator=generator)
        shift, scale, gate, *_ = embedding.chunk(6, dim=1)  # strided views, as in FLUX
        return dict(x=x, y=y, gate=gate, shift=shift, scale=scale)

    def without_gate(make):
        def make_ln(seed: int) -> dict:
            inputs = make(seed)
            return dict(x=inputs["x"], shift=inputs["shift"], scale=inputs["scale"])

        return make_ln

    shape = f"(1, {tokens}, {HIDDEN})"
    row_bytes = tokens * HIDDEN * 2
    return [
        dict(op="layernorm_modulate", shape=shape, bytes=2 * row_bytes, make_inputs=without_gate(make_inputs),
             kernel=layernorm_modulate, reference=layernorm_modulate_ref),
        dict(op="gated_residual_layernorm_modulate", shape=shape, bytes=4 * row_bytes, make_inputs=make_inputs,
             kernel=gated_residual_layernorm_modulate, reference=gated_residual_layernorm_modulate_ref),
    ]  # fmt: skip


def autotune_report(op: str) -> tuple[str | None, dict | None]:
    """The kernel's chosen config and, when it just tuned, every candidate's do_bench time (ms)."""
    from flux_kernels import layernorm_modulate as layernorm_module
    from flux_kernels import qk_norm_rope as qk_module

    kernel = {
        "qk_norm_rope": qk_module._qk_norm_rope_fwd_kernel,
        "layernorm_modulate": layernorm_module._layernorm_modulate_fwd_kernel,
        "gated_residual_layernorm_modulate": layernorm_module._gated_residual_layernorm_modulate_fwd_kernel,
    }[op]
    config = getattr(kernel, "best_config", None)
    timings = getattr(kernel, "configs_timings", None)
    candidates = {str(c): t for c, t in timings.items()} if timings else None
    return (str(config) if config is not None else None), candidates


def bench_case(case: dict, ceiling_gbps: float) -> list[dict]:
    op, shape, moved = case["op"], case["shape"], case["bytes"]
    sets = max(2, min(8, math.ceil(ROTATION_BYTES / moved)))
    input_sets = [case["make_inputs"](seed) for seed in range(sets)]
    kernel, reference = case["kernel"], case["reference"]
    compiled = torch.compile(reference, fullgraph=True)
    copy_src = [torch.empty(moved // 4, dtype=torch.bfloat16, device="cuda").normal_() for _ in range(sets)]

    def bind(fn, inputs):
        return lambda: fn(**inputs)

    impls = {
        "flux_kernels": [bind(kernel, inputs) for inputs in input_sets],
        "eager reference": [bind(reference, {**inputs, "upcast": False}) for inputs in input_sets],
        "torch.compile(reference)": [bind(compiled, {**inputs, "upcast": False}) for inputs in input_sets],
        "torch copy_ (same bytes)": [(lambda src=src: src.clone()) for src in copy_src],
    }
    rows = []
    for impl, fns in impls.items():
        row = {"op": op, "shape": shape, "impl": impl, "bytes": moved, "input_sets": sets}
        try:
            for fn in fns:  # autotuning / compilation outside the timing
                fn()
            torch.cuda.synchronize()
            if impl == "flux_kernels":
                row["config"], row["autotune_ms"] = autotune_report(op)
            row["host_us"] = host_us_per_call(fns[0])
            eager, gpu = do_bench_ms(fns[0]), gpu_ms(fns)
            gbps, eager_gbps = (moved / (t["median"] * 1e-3) / 1e9 for t in (gpu, eager))
            row.update(status="ok", gpu_ms=gpu, eager_ms=eager, gbps=gbps, pct_of_copy=100 * gbps / ceiling_gbps,
                       eager_gbps=eager_gbps, eager_pct_of_copy=100 * eager_gbps / ceiling_gbps)  # fmt: skip
        except Exception as error:  # noqa: BLE001 - recorded, the run goes on
            row.update(status=f"error: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        rows.append(row)
        print(f"  {op:34s} {shape:36s} {impl:26s} {format_row(row)}", flush=True)
    del input_sets, copy_src, impls
    torch.cuda.empty_cache()
    return rows


def format_row(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    gpu, eager = row["gpu_ms"], row["eager_ms"]
    return (
        f"gpu {gpu['median'] * 1e3:7.1f} us {row['gbps']:6.0f} GB/s {row['pct_of_copy']:5.1f}% | "
        f"eager {eager['median'] * 1e3:7.1f} us [{eager['p20'] * 1e3:.1f}, {eager['p80'] * 1e3:.1f}] "
        f"{row['eager_gbps']:6.0f} GB/s | host {row['host_us']:5.1f} us"
    )


def print_summary(rows: list[dict]) -> None:
    print("\nGB/s from gpu time (% of copy ceiling) / from eager time; best gpu time per op and shape marked *")
    keys = list(dict.fromkeys((row["op"], row["shape"]) for row in rows if row["op"] != "device copy"))
    for op, shape in keys:
        group = [row for row in rows if (row["op"], row["shape"]) == (op, shape)]
        ok = [row for row in group if row["status"] == "ok" and not row["impl"].startswith("torch copy_")]
        best = max(ok, key=lambda row: row["gbps"])["impl"] if ok else None
        cells = []
        for row in group:
            if row["status"] != "ok":
                cells.append(f"{row['impl']}: failed")
            else:
                mark = "*" if row["impl"] == best else ""
                cells.append(
                    f"{row['impl']}: {row['gbps']:.0f} ({row['pct_of_copy']:.0f}%)/{row['eager_gbps']:.0f}{mark}"
                )
        print(f"{op:34s} {shape:36s} " + " | ".join(cells))


def profile_host(path: Path, calls: int = 500) -> None:
    """cProfile of eager calls of the three ops at their smallest FLUX shapes: where the launch overhead goes."""
    import cProfile
    import io
    import pstats

    qk_inputs = qk_norm_rope_case(QK_IMAGE_TOKENS[0])["make_inputs"](0)
    ln_inputs = layernorm_cases(LAYERNORM_TOKENS[0])[1]["make_inputs"](0)
    ops = {
        "qk_norm_rope": lambda: qk_norm_rope(**qk_inputs),
        "layernorm_modulate": lambda: layernorm_modulate(ln_inputs["x"], ln_inputs["shift"], ln_inputs["scale"]),
        "gated_residual_layernorm_modulate": lambda: gated_residual_layernorm_modulate(**ln_inputs),
    }
    report = io.StringIO()
    for name, fn in ops.items():
        fn()
        torch.cuda.synchronize()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            fn()
        profiler.disable()
        torch.cuda.synchronize()
        report.write(f"===== {name}: {calls} eager calls\n")
        pstats.Stats(profiler, stream=report).sort_stats("tottime").print_stats(25)
    path.write_text(report.getvalue())
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--profile-host", type=Path, help="also write a cProfile of eager calls to this text file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_norm_ops: needs CUDA (no GPU visible to PyTorch); nothing measured", file=sys.stderr)
        return 2

    env = environment_info("cuda")
    print(f"{env['gpu']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}")
    ceiling = copy_ceiling()
    print(f"device copy ceiling: {ceiling['gbps']:.0f} GB/s (2 x {COPY_BYTES / 2**30:.0f} GiB / time)", flush=True)
    torch.cuda.empty_cache()
    ceiling_row = {"op": "device copy", "shape": f"{COPY_BYTES} bytes", "impl": "torch copy_", "status": "ok"}
    ceiling_row.update(bytes=2 * COPY_BYTES, eager_ms=ceiling["ms"], gbps=ceiling["gbps"], pct_of_copy=100.0)
    rows = [ceiling_row]
    cases = [qk_norm_rope_case(tokens) for tokens in QK_IMAGE_TOKENS]
    cases += [case for tokens in LAYERNORM_TOKENS for case in layernorm_cases(tokens)]
    for case in cases:
        rows += bench_case(case, ceiling["gbps"])
    print_summary(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    timing = "gbps/pct_of_copy from gpu_ms (CUDA graph, rotated inputs); eager_* from do_bench of the Python call"
    args.out.write_text(json.dumps({"env": env, "copy_ceiling": ceiling, "timing": timing, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    if args.profile_host is not None:
        profile_host(args.profile_host)
    return 0


if __name__ == "__main__":
    sys.exit(main())
