"""Whether the GPU keeps its clocks through FLUX's work: NVML's SM clock, power draw and clock-event reasons, sampled
every few milliseconds while (1) cuDNN's fp8 attention runs alone at 16,896 tokens (2048^2), for 20 calls and then
for ~600 back to back, and (2) the cuDNN preset makes 2048^2 images (4 steps a call).

    python -m benchmarks.power_probe --out results/power-probe-<gpu>-<date>.json

Why: in the 2048^2 step the attention core runs at 889 TFLOP/s against 1015-1031 alone, and kernel time taken out of
the step's memory-bound kernels did not show in its wall time (benchmarks/NOTES.md, 2026-12-01 04:16 and 04:30); a
card held at its power limit lowers its clocks, which would explain both. Needs CUDA, cudnn-frontend and nvidia-ml-py
(pynvml); exits 2 without them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from engine.measure import environment_info

# NVML clock-event reasons (nvml.h: nvmlClocksEventReason*)
REASONS = {"idle": 0x1, "sw_power_cap": 0x4, "hw_slowdown": 0x8, "sw_thermal": 0x20, "hw_thermal": 0x40,
           "hw_power_brake": 0x80}  # fmt: skip


class Sampler:
    """A thread reading the SM clock (MHz), the power draw (W) and the clock-event reasons every `period` s."""

    def __init__(self, period: float = 0.005):
        import pynvml

        self.nvml, self.period, self.samples, self.running = pynvml, period, [], False
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        self.limit_w = pynvml.nvmlDeviceGetEnforcedPowerLimit(self.handle) / 1000
        reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        self.reasons = reasons or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons

    def _read(self) -> tuple[int, float, int]:
        nvml, handle = self.nvml, self.handle
        clock = nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)
        return clock, nvml.nvmlDeviceGetPowerUsage(handle) / 1000, self.reasons(handle)

    def _run(self) -> None:
        while self.running:
            self.samples.append(self._read())
            time.sleep(self.period)

    def measure(self, work) -> dict:
        """work() under sampling -> its return value beside the samples' summary."""
        self.samples, self.running = [], True
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            value = work()
        finally:
            self.running = False
            thread.join()
        if not self.samples:  # work shorter than the thread's first read: one read after it
            self.samples.append(self._read())
        clocks = [s[0] for s in self.samples]
        powers = [s[1] for s in self.samples]
        share = {name: sum(bool(s[2] & bit) for s in self.samples) / max(len(self.samples), 1)
                 for name, bit in REASONS.items()}  # fmt: skip
        return {"value": value, "samples": len(self.samples), "sm_mhz_median": statistics.median(clocks),
                "sm_mhz_min": min(clocks), "sm_mhz_max": max(clocks), "power_w_mean": statistics.fmean(powers),
                "power_w_max": max(powers), "power_limit_w": self.limit_w, "reason_share": share}  # fmt: skip


def attention_tflops(calls: int, tokens: int = 16896) -> float:
    """cuDNN's fp8 attention (the engine's graph) `calls` times back to back at B=1, H=24, D=128 -> TFLOP/s."""
    from benchmarks.kernels.bench_cudnn_plans import inputs
    from flux_kernels import cudnn_attention as ca

    q8, k8, v8, qd, kd = inputs(tokens)
    ca.cudnn_fp8_attention_quantized(q8, k8, v8, qd, kd)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        ca.cudnn_fp8_attention_quantized(q8, k8, v8, qd, kd)
    end.record()
    end.synchronize()
    return 4 * 24 * tokens**2 * 128 * calls / (start.elapsed_time(end) / 1e3) / 1e12


def step_ms(pipe, size: int, steps: int, calls: int) -> float:
    """The preset's mean ms a step over `calls` calls of `steps` steps at size^2 (latents out, no decode)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        pipe("a photograph of an astronaut", height=size, width=size, num_inference_steps=steps,
             generator=torch.Generator().manual_seed(0), output_type="latent")  # fmt: skip
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / (calls * steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fp8-compile-fastacc-cudagraphs-cudnnattn")
    parser.add_argument("--res", type=int, default=2048)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("power_probe: needs a CUDA GPU", file=sys.stderr)
        return 2
    try:
        sampler = Sampler()
    except Exception as error:  # noqa: BLE001 - no NVML here: say so and stop
        print(f"power_probe: NVML unavailable ({error}); install nvidia-ml-py", file=sys.stderr)
        return 2
    result = {"env": environment_info(), "preset": args.preset, "res": args.res}
    result["attention_20_calls"] = sampler.measure(lambda: attention_tflops(20))
    time.sleep(2.0)  # let the card settle between phases
    result["attention_600_calls"] = sampler.measure(lambda: attention_tflops(600))
    from engine import FluxEngine, preset
    from engine.models import synthetic_components

    components = synthetic_components("flux-dev", device="cuda", dtype=torch.bfloat16, seed=0)
    pipe = FluxEngine.from_pipe(FluxEngine(**components), preset(args.preset))
    pipe.set_progress_bar_config(disable=True)
    step_ms(pipe, args.res, 2, 1)  # warm-up: compile, capture
    time.sleep(2.0)
    result["steps"] = sampler.measure(lambda: step_ms(pipe, args.res, 4, 3))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{'phase':22} {'value':>10} {'SM MHz med/min/max':>20} {'W mean/max (limit)':>22} power-cap share")
    for phase, unit in (("attention_20_calls", "TFLOP/s"), ("attention_600_calls", "TFLOP/s"), ("steps", "ms/step")):
        r = result[phase]
        clocks = f"{r['sm_mhz_median']:.0f}/{r['sm_mhz_min']:.0f}/{r['sm_mhz_max']:.0f}"
        print(f"{phase:22} {r['value']:8.1f} {unit:7} {clocks:>16} "
              f"{r['power_w_mean']:7.0f}/{r['power_w_max']:.0f} ({r['power_limit_w']:.0f}) "
              f"{r['reason_share']['sw_power_cap']:.2f} (hw slowdown {r['reason_share']['hw_slowdown']:.2f}, "
              f"thermal {r['reason_share']['sw_thermal']:.2f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
