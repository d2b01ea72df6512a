"""Timing, peak memory and fidelity: the numbers every benchmark and report is built from.

GPU time comes from CUDA events after warm-up (median of runs); peak memory from torch's allocator
and NVML's device view, reset between phases; fidelity as PSNR of images and relative error of
latents against the baseline with the same weights and seed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- environment


def git_commit() -> str:
    """Short commit of the working tree, with '+dirty' when it has uncommitted changes.

    $FLUX_ENGINE_COMMIT, when set, wins: a copy of the tree on another machine (the GPU runner) may carry a
    stale .git, which reported an older commit for every run of 2026-11-26 evening."""
    if os.environ.get("FLUX_ENGINE_COMMIT"):
        return os.environ["FLUX_ENGINE_COMMIT"]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not commit:
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _nvml_driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # noqa: BLE001 - NVML is optional: no driver, no library, no permission
        return None


def environment_info(device: torch.device | str | None = None) -> dict:
    """Everything a number needs beside it to be reproducible: card, driver, versions, commit, date."""
    import importlib.metadata as md

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    device = torch.device(device) if device is not None else None
    on_cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
    info = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),
        "cuda": torch.version.cuda,
        "device": "cuda" if on_cuda else "cpu",
        "gpu": torch.cuda.get_device_name(device) if on_cuda else None,
        "gpu_memory_gib": (
            round(torch.cuda.get_device_properties(device).total_memory / 2**30, 2) if on_cuda else None
        ),
        "driver": _nvml_driver_version() if on_cuda else None,
        "cpu": platform.processor() or platform.machine(),
    }
    return info


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Times one region: CUDA events on a GPU, perf_counter on a CPU. Read `.ms` after the block."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self.ms: float = float("nan")

    def __enter__(self) -> Timer:
        if self._cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self._cuda:
            self._end.record()
            self._end.synchronize()
            self.ms = self._start.elapsed_time(self._end)
        else:
            self.ms = (time.perf_counter() - self._t0) * 1e3


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def quantiles(values: list[float]) -> dict:
    """median, p20 and p80 of a list of timings."""
    if not values:
        return {"median": float("nan"), "p20": float("nan"), "p80": float("nan")}
    ordered = sorted(values)

    def at(q: float) -> float:
        pos = q * (len(ordered) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {"median": at(0.5), "p20": at(0.2), "p80": at(0.8)}


# ----------------------------------------------------------------------------- memory


@dataclass
class PeakMemory:
    allocated_gib: float | None = None
    reserved_gib: float | None = None
    nvml_used_gib: float | None = None

    def as_dict(self) -> dict:
        return {
            "allocated_gib": self.allocated_gib,
            "reserved_gib": self.reserved_gib,
            "nvml_used_gib": self.nvml_used_gib,
        }


def nvml_used_gib(device: torch.device | str) -> float | None:
    """Device memory in use as NVML sees it (all processes, the CUDA context included)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30
    except Exception:  # noqa: BLE001 - NVML is optional
        return None


@contextlib.contextmanager
def track_peak_memory(device: torch.device | str):
    """Yields a PeakMemory filled in on exit with the peaks reached inside the block (CUDA only).

    NVML has no peak counter; it is sampled at the end of the block, which is where the
    allocator's cached blocks are all still held, so it bounds what the block left resident.
    """
    device = torch.device(device)
    peak = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield peak
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak.allocated_gib = torch.cuda.max_memory_allocated(device) / 2**30
            peak.reserved_gib = torch.cuda.max_memory_reserved(device) / 2**30
            peak.nvml_used_gib = nvml_used_gib(device)


# ----------------------------------------------------------------------------- fidelity


def psnr(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of `image` against `reference`; inf when they are equal."""
    if image.shape != reference.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(image.shape)} and {tuple(reference.shape)}")
    mse = torch.mean((image.double() - reference.double()) ** 2).item()
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def ssim(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Structural similarity (Wang et al. 2004: an 11-px Gaussian window of sigma 1.5, K1 0.01, K2 0.03) of two
    [batch, channels, height, width] images, averaged over pixels, channels and batch; 1.0 when equal."""
    if image.shape != reference.shape or image.ndim != 4:
        raise ValueError(f"ssim needs equal [B, C, H, W] shapes, got {tuple(image.shape)} and {tuple(reference.shape)}")
    x, y = image.double(), reference.double()
    channels = x.shape[1]
    coords = torch.arange(11, dtype=torch.float64) - 5
    gauss = torch.exp(-(coords**2) / (2 * 1.5**2))
    window = (gauss[:, None] * gauss[None, :] / gauss.sum() ** 2).expand(channels, 1, 11, 11)

    def blur(values: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(values, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return score.mean().item()


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference|| (Frobenius), 0.0 when equal."""
    if value.shape != reference.shape:
        raise ValueError(f"relative_error needs equal shapes, got {tuple(value.shape)} and {tuple(reference.shape)}")
    ref = reference.double()
    denom = torch.linalg.vector_norm(ref).item()
    diff = torch.linalg.vector_norm(value.double() - ref).item()
    if denom == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / denom


def sqnr_db(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio, 20*log10(|ref| / |ref - value|), in dB."""
    err = relative_error(value, reference)
    return math.inf if err == 0.0 else -20.0 * math.log10(err)


# ----------------------------------------------------------------------------- kernel micro-benchmarks


def do_bench_ms(fn) -> dict:
    """Eager time of one call (triton.testing.do_bench, L2 flushed between calls): median, p20, p80 in ms."""
    import triton.testing

    return quantiles(list(triton.testing.do_bench(fn, return_mode="all")))


def cudagraph_ms(fn) -> dict:
    """Device time of one call, launch overhead removed (triton.testing.do_bench_cudagraph); call `fn` once
    before, since autotuning cannot run inside a graph capture."""
    import triton.testing

    return quantiles(list(triton.testing.do_bench_cudagraph(fn, return_mode="all")))


def event_ms(fn, calls: int = 5, warmup: int = 1) -> float:
    """Median ms of `calls` calls of `fn`, each timed alone between two CUDA events, after `warmup` untimed calls
    (long calls: a VAE decode, an attention plan; no L2 flush, no graph)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return median(times)


def host_us_per_call(fn, calls: int = 200) -> float:
    """CPU time of one call: back-to-back calls without a sync (the launch queue holds them), per call."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6
