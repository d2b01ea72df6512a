"""Micro-benchmark: flux_kernels.flash_attention.flash_attention and the quantised flux_kernels.fp8_attention against
every PyTorch SDPA backend that runs, PyTorch's default pick, and torch.compile of attention_ref, at FLUX's attention
shapes (B=1, H=24, D=128, bf16; L = 1536 / 4608 / 8704 / 16896 = 512 text + 1024 / 4096 / 8192 (Kontext at 1024^2:
the noise's and the picture's) / 16384 image tokens).
The quantised attention appears three ways: [core] its attention kernel alone on inputs quantised beforehand,
[qk8] what the engine runs after the QK-norm kernel wrote int8 q and k (V's quantisation included), [bf16-in] from
bf16 q, k, v (every quantisation included). cuDNN's fp8 SDPA (flux_kernels.cudnn_attention, when the cudnn-frontend
package is installed) appears as [core] (e4m3 inputs quantised beforehand, e4m3 output) and [bf16-in]. Their
accuracy: per-head output cosine against bf16 SDPA and fp32 attention on FLUX-like activations
(benchmarks/kernels/attention_inputs.py, four regimes), in the JSON's "fp8_accuracy".

    python -m benchmarks.kernels.bench_flash_attention --out benchmarks/results/attention_<gpu>_<date>.json

Two times per implementation, both as median, p20, p80: eager, triton.testing.do_bench of the Python call
(L2 flushed between runs: launch overhead shows where it exceeds the flush kernel's run time), and gpu,
triton.testing.do_bench_cudagraph of the same call after a warm-up call (autotuning cannot run in a graph):
the device time. TFLOP/s = 4 B H L^2 D / gpu time (eager_tflops from the eager time). host_us: the CPU time
of one call (back-to-back calls without a sync).
Each implementation's max abs error against an fp32 reference of the first heads is recorded beside it, and
for our kernel the autotuner's choice and every candidate config's time.
Needs CUDA: exits 2 without it.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

from benchmarks.kernels.attention_inputs import REGIMES, flux_like_qkv, per_head_cosine
from engine.measure import cudagraph_ms, do_bench_ms, environment_info, host_us_per_call
from flux_kernels import cudnn_attention as cudnn_fp8
from flux_kernels import fp8_attention as fp8
from flux_kernels.flash_attention import _flash_attention_fwd_kernel, attention_ref, flash_attention
from flux_kernels.fp8_attention_gluon import GLUON, fp8_attention_gluon_fwd

DEFAULT_LENGTHS = (1536, 4608, 8704, 16896)
TEXT_TOKENS = 512
CHECKED_HEADS = 2  # heads compared against the fp32 reference (bounded memory at L = 16896)
# the Gluon core's tiles timed: (BLOCK_M, BLOCK_N, stages), its two best on an H200 (2026-11-30: 64 x 64 with 3 stages
# and 128 x 128 with two warpgroups were 1-3% and 25-34% slower)
GLUON_TILES = ((64, 128, 3), (64, 64, 4))


def reference_head_error(out: torch.Tensor, q, k, v) -> float:
    heads = slice(0, CHECKED_HEADS)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        reference = attention_ref(q[:, heads], k[:, heads], v[:, heads], upcast=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return (out[:, heads].float() - reference).abs().max().item()


def implementations(q, k, v, qkv_views):
    """name -> (callable, note). Each callable returns [B, H, L, D]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    def with_backend(backend):
        def run():
            with sdpa_kernel([backend]):
                return sdpa(q, k, v)

        return run

    compiled_ref = torch.compile(attention_ref, fullgraph=True)
    q8, q_scale = fp8.quantize_qk(q)
    k8, k_scale = fp8.quantize_qk(k)
    vt8, v_scale = fp8.quantize_v(v)
    cudnn_core = cudnn_fp8.unavailable_reason() is None
    if cudnn_core:
        cq8, cq_descale = cudnn_fp8.quantize_tensor(q)
        ck8, ck_descale = cudnn_fp8.quantize_tensor(k)
        cv8, _ = cudnn_fp8.quantize_v_channels(v)
    return {
        "cudnn_fp8[core]": (
            (lambda: cudnn_fp8.cudnn_fp8_attention_quantized(cq8, ck8, cv8, cq_descale, ck_descale))
            if cudnn_core
            else functools.partial(cudnn_fp8.cudnn_fp8_attention, q, k, v),  # raises, saying why
            "cuDNN's fp8 SDPA, e4m3 Q, K (one scale each), V (per channel), e4m3 out; inputs quantised beforehand",
        ),
        "cudnn_fp8[bf16-in]": (
            functools.partial(cudnn_fp8.cudnn_fp8_attention, q, k, v),
            "q, k, v quantised in the call (V per channel, its scales applied to the output)",
        ),
        "fp8_attention[core]": (
            lambda: fp8.fp8_attention_quantized_fwd(q8, q_scale, k8, k_scale, vt8, v_scale),
            "int8 QK^T, e4m3 PV; inputs quantised beforehand",
        ),
        "fp8_attention[qk8]": (
            lambda: fp8.fp8_attention_qk8(q8, q_scale, k8, k_scale, v),
            "int8 q, k as the QK-norm kernel writes them; V quantised in the call",
        ),
        "fp8_attention[bf16-in]": (lambda: fp8.fp8_attention(q, k, v), "q, k, v quantised in the call"),
        **{
            f"fp8_attention[gluon core, {block_m}x{block_n}, {stages} stages]": (
                functools.partial(
                    fp8_attention_gluon_fwd,
                    q8,
                    q_scale,
                    k8,
                    k_scale,
                    vt8,
                    v_scale,
                    block_m=block_m,
                    block_n=block_n,
                    stages=stages,
                ),
                "the Gluon kernel (MMA and softmax overlapped); inputs quantised beforehand",
            )
            for block_m, block_n, stages in GLUON_TILES
            if GLUON and torch.cuda.get_device_capability()[0] == 9 and q.shape[-1] == 128
        },
        "flux_kernels.flash_attention": (lambda: flash_attention(q, k, v), "autotuned"),
        "flux_kernels.flash_attention[qkv-views]": (
            lambda: flash_attention(*qkv_views),
            "inputs are views of one [B, L, 3, H, D] projection output",
        ),
        "sdpa[FLASH_ATTENTION]": (with_backend(SDPBackend.FLASH_ATTENTION), ""),
        "sdpa[EFFICIENT_ATTENTION]": (with_backend(SDPBackend.EFFICIENT_ATTENTION), ""),
        "sdpa[CUDNN_ATTENTION]": (with_backend(SDPBackend.CUDNN_ATTENTION), ""),
        "sdpa[default]": (lambda: sdpa(q, k, v), "PyTorch's own backend choice"),
        "torch.compile(attention_ref)": (lambda: compiled_ref(q, k, v, None, False), "bf16, fullgraph, inductor"),
    }


def autotune_report(kernel=_flash_attention_fwd_kernel) -> tuple[str | None, dict | None]:
    """The kernel's chosen config and, when it just tuned, every candidate's do_bench time (ms)."""
    config = getattr(kernel, "best_config", None)
    timings = getattr(kernel, "configs_timings", None)
    candidates = {str(c): t for c, t in timings.items()} if timings else None
    return (str(config) if config is not None else None), candidates


def bench_length(tokens: int, batch: int, heads: int, head_dim: int) -> list[dict]:
    generator = torch.Generator(device="cuda").manual_seed(tokens)
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=generator)
    qkv_views = tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))
    q, k, v = (x.contiguous() for x in qkv_views)  # [B, H, L, D] contiguous, what SDPA callers usually pass
    flops = 4 * batch * heads * tokens * tokens * head_dim
    rows = []
    for name, (fn, note) in implementations(q, k, v, qkv_views).items():
        row = {"impl": name, "tokens": tokens, "batch": batch, "heads": heads, "head_dim": head_dim, "note": note}
        kernel = fp8._fp8_attention_fwd_kernel if name.startswith("fp8") else _flash_attention_fwd_kernel
        try:
            tuned_before = getattr(kernel, "configs_timings", None)
            out = fn()  # first call: autotuning / compilation, outside the timing
            torch.cuda.synchronize()
            if name.startswith(("flux_kernels", "fp8")):
                row["config"], candidates = autotune_report(kernel)
                if candidates is not None and getattr(kernel, "configs_timings", None) is not tuned_before:
                    row["autotune_ms"] = candidates
            row["max_abs_err_vs_fp32"] = reference_head_error(out, q, k, v)
            del out
            row["host_us"] = host_us_per_call(fn, calls=20)
            eager, gpu = do_bench_ms(fn), cudagraph_ms(fn)
            row.update(status="ok", gpu_ms=gpu, eager_ms=eager)
            row.update(
                tflops=flops / (gpu["median"] * 1e-3) / 1e12, eager_tflops=flops / (eager["median"] * 1e-3) / 1e12
            )
        except Exception as error:  # noqa: BLE001 - a backend that cannot run these shapes is a result too
            row.update(status=f"error: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        finally:
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"  {name:42s} {format_row(row)}", flush=True)
    return rows


def fp8_accuracy(lengths, heads: int, head_dim: int) -> list[dict]:
    """Per-head cosine of fp8_attention's output against bf16 SDPA (PyTorch's pick) and, on two heads, fp32
    attention, on FLUX-like q, k, v of every regime."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    rows = []
    for tokens in lengths:
        for regime in REGIMES:
            q, k, v = flux_like_qkv(TEXT_TOKENS, tokens - TEXT_TOKENS, heads, head_dim, regime, device="cuda")
            out = fp8.fp8_attention(q, k, v)
            reference = sdpa(q, k, v)
            vs_bf16 = per_head_cosine(out, reference)
            bf16_vs_fp32 = per_head_cosine(
                sdpa(q[:, :2], k[:, :2], v[:, :2]), attention_ref(q[:, :2], k[:, :2], v[:, :2])
            )
            vs_fp32 = per_head_cosine(out[:, :2], attention_ref(q[:, :2], k[:, :2], v[:, :2]))
            row = {"tokens": tokens, "regime": regime, "cos_vs_bf16_min": vs_bf16.min().item(),
                   "cos_vs_bf16_mean": vs_bf16.mean().item(), "cos_vs_fp32_min_2heads": vs_fp32.min().item(),
                   "bf16_sdpa_cos_vs_fp32_min_2heads": bf16_vs_fp32.min().item()}  # fmt: skip
            if cudnn_fp8.unavailable_reason() is None:
                for scaling in ("channel", "tensor"):
                    cudnn_out = cudnn_fp8.cudnn_fp8_attention(q, k, v, v_scaling=scaling)
                    row[f"cudnn_v_{scaling}_cos_vs_bf16_min"] = per_head_cosine(cudnn_out, reference).min().item()
                    row[f"cudnn_v_{scaling}_cos_vs_fp32_min_2heads"] = (
                        per_head_cosine(cudnn_out[:, :2], attention_ref(q[:, :2], k[:, :2], v[:, :2])).min().item()
                    )
                print(f"  cudnn fp8 accuracy L={tokens:6d} {regime:9s} cos vs bf16 min: V per channel "
                      f"{row['cudnn_v_channel_cos_vs_bf16_min']:.5f}, V per tensor "
                      f"{row['cudnn_v_tensor_cos_vs_bf16_min']:.5f}", flush=True)  # fmt: skip
            rows.append(row)
            print(f"  fp8 accuracy L={tokens:6d} {regime:9s} cos vs bf16 min {row['cos_vs_bf16_min']:.5f} mean "
                  f"{row['cos_vs_bf16_mean']:.5f} | vs fp32 (2 heads) {row['cos_vs_fp32_min_2heads']:.5f} "
                  f"(bf16 SDPA itself {row['bf16_sdpa_cos_vs_fp32_min_2heads']:.5f})", flush=True)  # fmt: skip
            del q, k, v, out
            torch.cuda.empty_cache()
    return rows


def format_row(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    gpu, eager = row["gpu_ms"], row["eager_ms"]
    return (
        f"gpu {gpu['median']:7.3f} ms {row['tflops']:6.1f} TFLOP/s | eager {eager['median']:7.3f} ms "
        f"[{eager['p20']:.3f}, {eager['p80']:.3f}] {row['eager_tflops']:6.1f} TFLOP/s | "
        f"err {row['max_abs_err_vs_fp32']:.2e} | host {row['host_us']:.0f} us"
    )


def print_summary(rows: list[dict]) -> None:
    print("\nTFLOP/s from gpu time / from eager time; best gpu time per length marked *")
    lengths = sorted({row["tokens"] for row in rows})
    names = list(dict.fromkeys(row["impl"] for row in rows))
    print(f"{'impl':42s}" + "".join(f"{length:>16d}" for length in lengths))
    best = {}
    for length in lengths:
        ok = [row for row in rows if row["tokens"] == length and row["status"] == "ok"]
        best[length] = max(ok, key=lambda row: row["tflops"])["impl"] if ok else None
    for name in names:
        cells = []
        for length in lengths:
            row = next(row for row in rows if row["impl"] == name and row["tokens"] == length)
            if row["status"] != "ok":
                cells.append(f"{'failed':>16s}")
            else:
                mark = "*" if best[length] == name else " "
                cells.append(f"{row['tflops']:8.1f}/{row['eager_tflops']:5.0f}{mark}")
        print(f"{name:42s}" + "".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_flash_attention: needs CUDA (no GPU visible to PyTorch); nothing measured", file=sys.stderr)
        return 2

    env = environment_info("cuda")
    print(f"{env['gpu']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}")
    rows = []
    for tokens in args.lengths:
        print(f"L = {tokens}", flush=True)
        rows += bench_length(tokens, args.batch, args.heads, args.head_dim)
    print("fp8 attention accuracy (FLUX-like activations)", flush=True)
    accuracy = fp8_accuracy(args.lengths, args.heads, args.head_dim)
    print_summary(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    timing = "tflops from gpu_ms (CUDA graph); eager_tflops from eager_ms (do_bench of the Python call)"
    result = {"env": env, "timing": timing, "rows": rows, "fp8_accuracy": accuracy}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
