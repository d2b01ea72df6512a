"""Micro-benchmark: the kernels of kernels/norm.py against their eager PyTorch references and
torch.compile of those references, at FLUX shapes, in GB/s and as a share of the card's copy ceiling.

    python benchmarks/bench_norm.py --out benchmarks/results/norm_<gpu>_<date>.json

qk_norm_rope: B=1, H=24, D=128, L_txt=512, L_img=1024 / 4096 / 16384 (double-stream layout).
layernorm_modulate, gated_residual_layernorm_modulate: (1, L, 3072), L = 4608 / 16896.
Times are triton.testing.do_bench (L2 flushed between runs) as median, p20, p80. GB/s counts the bytes a
fused kernel must move (inputs read once, outputs written once); the copy ceiling is a ~1 GiB device-to-device
copy measured in the same run, 2 * bytes / time. Needs CUDA: exits 2 without it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.measure import environment_info, quantiles  # noqa: E402
from kernels.norm import (  # noqa: E402
    gated_residual_layernorm_modulate,
    gated_residual_layernorm_modulate_ref,
    layernorm_modulate,
    layernorm_modulate_ref,
    qk_norm_rope,
    qk_norm_rope_ref,
)

HEADS, HEAD_DIM, HIDDEN, TEXT_TOKENS = 24, 128, 3072, 512
QK_IMAGE_TOKENS = (1024, 4096, 16384)
LAYERNORM_TOKENS = (4608, 16896)
COPY_BYTES = 2**30


def time_ms(fn) -> dict:
    import triton.testing

    return quantiles(list(triton.testing.do_bench(fn, return_mode="all")))


def copy_ceiling() -> dict:
    src = torch.empty(COPY_BYTES // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    timing = time_ms(lambda: dst.copy_(src))
    return {"bytes": COPY_BYTES, "ms": timing, "gbps": 2 * COPY_BYTES / (timing["median"] * 1e-3) / 1e9}


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def qk_norm_rope_case(image_tokens: int):
    generator = torch.Generator(device="cuda").manual_seed(image_tokens)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=generator)

    width = 3 * HEADS * HEAD_DIM
    total = TEXT_TOKENS + image_tokens
    inputs = dict(
        qkv=randn(1, image_tokens, width), q_weight=randn(HEAD_DIM), k_weight=randn(HEAD_DIM),
        cos=randn(total, HEAD_DIM, dtype=torch.float32), sin=randn(total, HEAD_DIM, dtype=torch.float32),
        heads=HEADS, txt_qkv=randn(1, TEXT_TOKENS, width), txt_q_weight=randn(HEAD_DIM),
        txt_k_weight=randn(HEAD_DIM),
    )  # fmt: skip
    outputs = 3 * total * HEADS * HEAD_DIM * 2
    moved = nbytes(inputs["qkv"], inputs["txt_qkv"], inputs["cos"], inputs["sin"]) + outputs
    shape = f"L_txt={TEXT_TOKENS} L_img={image_tokens} H={HEADS} D={HEAD_DIM}"
    return (
        "qk_norm_rope",
        shape,
        moved,
        lambda: qk_norm_rope(**inputs),
        lambda: qk_norm_rope_ref(**inputs, upcast=False),
        qk_norm_rope_ref,
        inputs,
    )


def layernorm_cases(tokens: int):
    generator = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(1, tokens, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=generator)
    y = torch.randn_like(x)
    embedding = torch.randn(1, 6 * HIDDEN, device="cuda", dtype=torch.bfloat16, generator=generator)
    shift, scale, gate, *_ = embedding.chunk(6, dim=1)  # strided views, as in FLUX
    shape = f"(1, {tokens}, {HIDDEN})"
    ln_inputs = dict(x=x, shift=shift, scale=scale)
    gated_inputs = dict(x=x, y=y, gate=gate, shift=shift, scale=scale)
    return [
        (
            "layernorm_modulate",
            shape,
            2 * nbytes(x),
            lambda: layernorm_modulate(**ln_inputs),
            lambda: layernorm_modulate_ref(**ln_inputs, upcast=False),
            layernorm_modulate_ref,
            ln_inputs,
        ),
        (
            "gated_residual_layernorm_modulate",
            shape,
            4 * nbytes(x),
            lambda: gated_residual_layernorm_modulate(**gated_inputs),
            lambda: gated_residual_layernorm_modulate_ref(**gated_inputs, upcast=False),
            gated_residual_layernorm_modulate_ref,
            gated_inputs,
        ),
    ]


def best_config(op: str) -> str | None:
    from kernels import norm

    kernel = {
        "qk_norm_rope": norm._qk_norm_rope_fwd_kernel,
        "layernorm_modulate": norm._layernorm_modulate_fwd_kernel,
        "gated_residual_layernorm_modulate": norm._gated_residual_layernorm_modulate_fwd_kernel,
    }[op]
    config = getattr(kernel, "best_config", None)
    return str(config) if config is not None else None


def bench_case(case, ceiling_gbps: float) -> list[dict]:
    op, shape, moved, kernel_fn, eager_fn, reference, inputs = case
    compiled = torch.compile(reference, fullgraph=True)

    def compiled_fn():
        return compiled(**inputs, upcast=False)

    rows = []
    for impl, fn in (
        ("flux_kernels", kernel_fn),
        ("eager reference", eager_fn),
        ("torch.compile(reference)", compiled_fn),
    ):
        row = {"op": op, "shape": shape, "impl": impl, "bytes": moved}
        try:
            fn()  # autotuning / compilation outside the timing
            torch.cuda.synchronize()
            timing = time_ms(fn)
            gbps = moved / (timing["median"] * 1e-3) / 1e9
            row.update(status="ok", ms=timing, gbps=gbps, pct_of_copy=100 * gbps / ceiling_gbps)
            if impl == "flux_kernels":
                row["config"] = best_config(op)
        except Exception as error:  # noqa: BLE001 - recorded, the run goes on
            row.update(status=f"error: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        rows.append(row)
        print(f"  {op:34s} {shape:40s} {impl:26s} {format_row(row)}", flush=True)
    return rows


def format_row(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    ms = row["ms"]
    return (
        f"{ms['median'] * 1e3:8.1f} us [{ms['p20'] * 1e3:.1f}, {ms['p80'] * 1e3:.1f}]  "
        f"{row['gbps']:7.1f} GB/s  {row['pct_of_copy']:5.1f}% of copy"
    )


def print_summary(rows: list[dict]) -> None:
    print("\nGB/s (median, % of copy ceiling); best per op and shape marked *")
    keys = list(dict.fromkeys((row["op"], row["shape"]) for row in rows))
    for op, shape in keys:
        group = [row for row in rows if (row["op"], row["shape"]) == (op, shape)]
        ok = [row for row in group if row["status"] == "ok"]
        best = max(ok, key=lambda row: row["gbps"])["impl"] if ok else None
        cells = []
        for row in group:
            if row["status"] != "ok":
                cells.append(f"{row['impl']}: failed")
            else:
                mark = "*" if row["impl"] == best else ""
                cells.append(f"{row['impl']}: {row['gbps']:.0f} ({row['pct_of_copy']:.0f}%){mark}")
        print(f"{op:34s} {shape:40s} " + " | ".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_norm: needs CUDA (no GPU visible to PyTorch); nothing measured", file=sys.stderr)
        return 2

    env = environment_info("cuda")
    print(f"{env['gpu']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}")
    ceiling = copy_ceiling()
    print(f"device copy ceiling: {ceiling['gbps']:.0f} GB/s (2 x {COPY_BYTES / 2**30:.0f} GiB / time)", flush=True)
    torch.cuda.empty_cache()
    rows = [{"op": "device copy", "shape": f"{COPY_BYTES} bytes", "impl": "torch copy_", "status": "ok",
             "bytes": 2 * COPY_BYTES, "ms": ceiling["ms"], "gbps": ceiling["gbps"], "pct_of_copy": 100.0}]  # fmt: skip
    cases = [qk_norm_rope_case(tokens) for tokens in QK_IMAGE_TOKENS]
    for case in cases:
        rows += bench_case(case, ceiling["gbps"])
    for tokens in LAYERNORM_TOKENS:
        for case in layernorm_cases(tokens):
            rows += bench_case(case, ceiling["gbps"])
    print_summary(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": env, "copy_ceiling": ceiling, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
