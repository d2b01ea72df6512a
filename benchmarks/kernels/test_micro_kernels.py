"""Kernel micro-benchmarks as pytest-benchmark tests, for regression checks against a saved run (CUDA only).

At FLUX shapes, bf16, each beside what it replaces:
- attention: flux_kernels.flash_attention.flash_attention vs PyTorch SDPA (its own backend pick), B=1, H=24, D=128,
  L = 4608 / 16896 (512 text + 4096 / 16384 image tokens: 1024^2 / 2048^2); TFLOP/s = 4 B H L^2 D / time.
- flux_kernels.qk_norm_rope / flux_kernels.layernorm_modulate: qk_norm_rope, layernorm_modulate,
  gated_residual_layernorm_modulate vs their eager PyTorch references, 4608 / 16896 tokens, hidden 3072 (cases,
  byte counts and references from kernels/bench_norm_ops.py);
  GB/s = the bytes a fused kernel must move / time.
- layernorm_modulate into an fp8 projection, 4608 / 16896 tokens: the kernel with e4m3 outputs vs the bf16 kernel
  then the activation quantiser (eager, and both in one torch.compile graph).
- linear at the MLP shape of bench_quant.py (4608x3072 @ 3072x12288): bf16 nn.Linear vs engine.quant's
  Fp8Linear on `torch._scaled_mm` (activation quantisation included), and `_scaled_mm` alone; each fp8 one also
  with fast accumulation.

Each round times `calls` back-to-back calls and one torch.cuda.synchronize after the last (`calls` picked so a
round lasts ~5 ms), so the per-call figure is device time with the launches queued ahead, not launch + sync
latency; the first call (autotuning, compilation) happens before. Norm inputs rotate over several sets (and outputs
stay alive) so that no call finds its data in L2, as in kernels/bench_norm_ops.py. extra_info of each benchmark:
the card, shapes, TFLOP/s or GB/s from the median, peak memory of one call (torch.cuda.max_memory_allocated after a
reset: its inputs, outputs and workspace) and the part of it above the inputs, in MiB. Device time of record stays
with kernels/bench_flash_attention.py / kernels/bench_norm_ops.py (CUDA graphs); these are for spotting a
regression (bench_fp8_fusion.py for the fp8-output kernels: the back-to-back timing of the compiled
"kernel_then_quantize" variants here is host-bound, not device time). Skipped without CUDA. On an H100 the first 19
took 40 s (2026-11-26 21:10 UTC); the norm-into-fp8 and fast-accumulation ones 30 s (22:28 UTC).

Save a baseline, then compare a later run against it (fails when a median is more than 10% slower):

    pytest benchmarks/kernels/test_micro_kernels.py --benchmark-save=h100 --benchmark-storage=benchmarks/results/micro
    pytest benchmarks/kernels/test_micro_kernels.py --benchmark-storage=benchmarks/results/micro \
        --benchmark-compare --benchmark-compare-fail=median:10%

(`--benchmark-compare` takes the newest saved run of this machine and Python; `--benchmark-compare=0001` a
given one.) `-k attention` etc. picks a group.
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
import time
from collections.abc import Callable

import pytest
import torch

from benchmarks.bench_quant import MLP_SHAPE
from benchmarks.kernels.bench_norm_ops import ROTATION_BYTES, TEXT_TOKENS, layernorm_cases, qk_norm_rope_case
from engine.measure import synchronize

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HEADS, HEAD_DIM = 24, 128
TOKENS = (4608, 16896)  # joint text + image sequence at 1024^2 and 2048^2
NORM_OPS = ("qk_norm_rope", "layernorm_modulate", "gated_residual_layernorm_modulate")
ROUNDS, WARMUP_ROUNDS = 30, 3
ROUND_S = 5e-3  # target length of one timed round
MAX_CALLS = 200
MIB = 2**20


def calls_per_round(fns: list[Callable[[], object]], device: torch.device, probe_calls: int = 10) -> int:
    """How many back-to-back calls fill ROUND_S, from the time of a few queued ones."""
    synchronize(device)
    start = time.perf_counter()
    for fn in itertools.islice(itertools.cycle(fns), probe_calls):
        fn()
    synchronize(device)
    per_call = (time.perf_counter() - start) / probe_calls
    return max(1, min(MAX_CALLS, math.ceil(ROUND_S / per_call)))


def synchronized_every(fns: list[Callable[[], object]], calls: int, device: torch.device) -> Callable[[], None]:
    """One call per invocation, cycling over `fns` (one per input set), with a synchronize after every
    `calls`-th: benchmark.pedantic(iterations=calls) then times `calls` queued launches and the wait for the
    last. The newest outputs stay allocated, so no call writes into a buffer that is still in L2."""
    next_fn, count = itertools.cycle(fns), itertools.count(1)
    alive = collections.deque(maxlen=len(fns))

    def call() -> None:
        alive.append(next(next_fn)())
        if next(count) % calls == 0:
            synchronize(device)

    return call


def peak_of_one_call(fn: Callable[[], object], device: torch.device) -> dict:
    """Peak allocated memory (MiB) of one call: in all, and above what was allocated before it."""
    if device.type != "cuda":
        return {"peak_mib": None, "peak_above_inputs_mib": None}
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return {"peak_mib": round(peak / MIB, 1), "peak_above_inputs_mib": round((peak - before) / MIB, 1)}


def run_benchmark(
    benchmark,
    make_call: Callable[[int], Callable[[], object]],
    device: torch.device,
    shape: dict,
    sets: int = 1,
    flops: int | None = None,
    bytes_moved: int | None = None,
) -> None:
    """Warm up, measure one call's peak memory, time with benchmark.pedantic and fill extra_info.

    make_call(seed): the call on its own input set; `sets` of them are rotated through in the timing (one is
    enough where L2 does not matter). The other sets are built after the memory measurement, so the peak
    holds one set. The group named by the test's benchmark marker gets the shape appended: each table then
    compares implementations at one shape.
    """
    benchmark.group = f"{benchmark.group} {shape['label']}"
    first = make_call(0)
    first()  # autotuning / compilation, outside everything measured
    synchronize(device)
    memory = peak_of_one_call(first, device)
    fns = [first] + [make_call(seed) for seed in range(1, sets)]
    calls = calls_per_round(fns, device)
    benchmark.pedantic(
        synchronized_every(fns, calls, device), rounds=ROUNDS, iterations=calls, warmup_rounds=WARMUP_ROUNDS
    )
    synchronize(device)
    info = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        **shape,
        **memory,
        "calls_per_round": calls,
        "input_sets": sets,
    }
    if benchmark.stats is not None:  # None under --benchmark-disable: the call ran once, untimed
        median_s = benchmark.stats.stats.median
        info["median_ms"] = median_s * 1e3
        if flops is not None:
            info["tflops"] = round(flops / median_s / 1e12, 1)
        if bytes_moved is not None:
            info["gbps"] = round(bytes_moved / median_s / 1e9, 1)
    benchmark.extra_info.update(info)


# ----------------------------------------------------------------------------- attention


@pytest.mark.benchmark(group="attention")
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"L{t}")
@pytest.mark.parametrize("impl", ["flash_attention", "sdpa"])
def test_attention(benchmark, impl: str, tokens: int):
    from torch.nn.functional import scaled_dot_product_attention

    from flux_kernels.flash_attention import flash_attention

    device = torch.device("cuda")
    attention = flash_attention if impl == "flash_attention" else scaled_dot_product_attention

    def make_call(seed: int):
        generator = torch.Generator(device).manual_seed(seed)
        # q, k, v: [B, H, L, D] contiguous, as bench_flash_attention.py's headline rows
        q, k, v = (
            torch.randn(1, HEADS, tokens, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=generator)
            for _ in range(3)
        )
        return functools.partial(attention, q, k, v)

    flops = 4 * 1 * HEADS * tokens * tokens * HEAD_DIM  # QK^T and PV: B H L^2 D multiply-adds each
    shape = {"label": f"L={tokens}", "batch": 1, "heads": HEADS, "tokens": tokens, "head_dim": HEAD_DIM}
    run_benchmark(benchmark, make_call, device, shape, flops=flops)


# ----------------------------------------------------------------------------- norms


def norm_case(op: str, tokens: int) -> dict:
    """bench_norm_ops.py's case for `op` at `tokens` joint tokens (qk_norm_rope: 512 of them text)."""
    if op == "qk_norm_rope":
        return qk_norm_rope_case(tokens - TEXT_TOKENS)
    return next(case for case in layernorm_cases(tokens) if case["op"] == op)


@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"L{t}")
@pytest.mark.parametrize("op", [pytest.param(op, marks=pytest.mark.benchmark(group=op)) for op in NORM_OPS])
@pytest.mark.parametrize("impl", ["kernel", "eager_ref"])
def test_norm(benchmark, impl: str, op: str, tokens: int):
    device = torch.device("cuda")
    case = norm_case(op, tokens)
    # the reference in the input dtype: what diffusers runs where the kernel would
    fn = case["kernel"] if impl == "kernel" else functools.partial(case["reference"], upcast=False)

    def make_call(seed: int):
        return functools.partial(fn, **case["make_inputs"](seed))

    shape = {"label": f"L={tokens}", "tokens": tokens, "shape": case["shape"], "bytes": case["bytes"]}
    sets = max(2, min(8, math.ceil(ROTATION_BYTES / case["bytes"])))  # as bench_norm_ops.py rotates
    run_benchmark(benchmark, make_call, device, shape, sets=sets, bytes_moved=case["bytes"])


# ----------------------------------------------------------------------------- norm into an fp8 linear


@pytest.mark.benchmark(group="layernorm_modulate -> fp8 input")
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"L{t}")
@pytest.mark.parametrize("impl", ["fused_fp8_kernel", "kernel_then_quantize", "kernel_then_quantize_compiled"])
def test_norm_into_fp8(benchmark, impl: str, tokens: int):
    """The fp8 projection's input from a LayerNorm+modulate: our kernel writing e4m3 + per-token scales (what the
    fused blocks run), against our bf16 kernel followed by the activation quantiser (what Fp8Linear does
    eagerly: a compiled quantiser), and against both inside one torch.compile graph (what the compiled blocks
    without the fusion run: the custom op, then one inductor kernel). GB/s over the fused kernel's bytes."""
    from engine.quant.fp8 import _quantize_activations
    from flux_kernels.fp8 import quantize_fp8_rowwise
    from flux_kernels.layernorm_modulate import layernorm_modulate, layernorm_modulate_fp8

    device = torch.device("cuda")
    case = norm_case("layernorm_modulate", tokens)
    if impl == "fused_fp8_kernel":
        fn = layernorm_modulate_fp8
    elif impl == "kernel_then_quantize":

        def fn(x, shift, scale):
            return _quantize_activations(layernorm_modulate(x, shift, scale))

    else:
        fn = torch.compile(lambda x, shift, scale: quantize_fp8_rowwise(layernorm_modulate(x, shift, scale)))

    def make_call(seed: int):
        return functools.partial(fn, **case["make_inputs"](seed))

    fused_bytes = case["bytes"] // 2 * 3 // 2 + tokens * 4  # read bf16, write e4m3 and an fp32 scale per token
    shape = {"label": f"L={tokens}", "tokens": tokens, "shape": case["shape"], "bytes": fused_bytes}
    sets = max(2, min(8, math.ceil(ROTATION_BYTES / fused_bytes)))
    run_benchmark(benchmark, make_call, device, shape, sets=sets, bytes_moved=fused_bytes)


# ----------------------------------------------------------------------------- fp8 linear


@pytest.mark.benchmark(group="linear")
@pytest.mark.parametrize(
    "impl", ["bf16", "fp8", "fp8_scaled_mm_only", "fp8_fast_accum", "fp8_scaled_mm_only_fast_accum"]
)
def test_linear(benchmark, impl: str):
    from engine.quant import Fp8Linear, fp8_compute_for
    from flux_kernels.fp8 import quantize_fp8_rowwise

    device = torch.device("cuda")
    if impl != "bf16" and fp8_compute_for(device) != "scaled_mm":
        pytest.skip(f"{torch.cuda.get_device_name(device)} has no FP8 tensor cores (needs compute capability 8.9+)")
    tokens, in_features, out_features = MLP_SHAPE
    generator = torch.Generator(device).manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, device=device, dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(tokens, in_features, device=device, dtype=torch.bfloat16, generator=generator)  # [M, K]
    if impl == "bf16":
        call = functools.partial(linear, x)
    elif impl in ("fp8", "fp8_fast_accum"):
        layer = Fp8Linear.from_linear(linear, compute="scaled_mm")
        layer.fast_accum = impl == "fp8_fast_accum"
        call = functools.partial(layer, x)
    else:  # the GEMM alone, activations quantised beforehand
        fp8 = Fp8Linear.from_linear(linear, compute="scaled_mm")
        x_fp8, x_scale = quantize_fp8_rowwise(x)  # [M, K] e4m3, [M, 1]
        call = functools.partial(
            torch._scaled_mm, x_fp8, fp8.weight_fp8.t(), scale_a=x_scale, scale_b=fp8.weight_scale.view(1, -1),
            bias=fp8.bias, out_dtype=torch.bfloat16, use_fast_accum=impl.endswith("fast_accum"),
        )  # fmt: skip
    del linear  # the fp8 calls do not hold its bf16 weight: it must not count in their peak
    flops = 2 * tokens * in_features * out_features
    shape = {"label": f"{tokens}x{in_features}@{in_features}x{out_features}", "tokens": tokens,
             "in_features": in_features, "out_features": out_features}  # fmt: skip
    run_benchmark(benchmark, lambda seed: call, device, shape, flops=flops)
