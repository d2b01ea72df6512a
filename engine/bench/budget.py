"""engine.bench --vram GiB: per emulated card size and resolution, the memory planner's config (engine.memory.planner),
run with the GPU capped to that size; and the Job each config of a run is."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import EngineError
from .plan import Plan


def release_cached_memory(device: torch.device) -> None:
    """Hand the allocator's cached blocks back, so that reserved and NVML peaks belong to this phase alone
    (otherwise a config measured after a larger one inherits its cache)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@dataclass
class Job:
    """One engine config to run at some sizes; a --vram job also carries its budget and the plan's prediction."""

    config: object
    sizes: list
    budget_gib: float | None = None
    predicted_peak_gib: float | None = None
    explanation: str = ""


def budget_jobs(plan: Plan, args) -> list[Job]:
    """Per --vram budget and size, the planner's choice (printed with the reasons)."""
    if not args.budgets:
        return []
    from flux_kernels import triton_runnable

    from ..memory.planner import plan as make_budget_plan
    from ..quant.fp8 import fp8_compute_for

    if plan.spec is None:
        raise EngineError("--vram plans for the synthetic variants' architectures; use --model synthetic:flux-dev")
    fp8_hardware = plan.device.type == "cuda" and fp8_compute_for(plan.device) == "scaled_mm"
    jobs = []
    for budget in args.budgets:
        for size in plan.sizes:
            chosen = make_budget_plan(
                budget, *size, variant=plan.spec.name, batch=args.batch, steps=args.steps, quality=args.quality,
                fp8_hardware=fp8_hardware, triton=triton_runnable(plan.device), task=args.task,
            )  # fmt: skip
            explanation = chosen.explain()
            print(explanation)
            jobs.append(Job(chosen.config, [size], budget, chosen.chosen.peak_gib, explanation))
    return jobs


@contextmanager
def emulated_budget(budget_gib: float | None, device: torch.device):
    """The GPU capped to `budget_gib` for the block (nothing on a CPU, or without a budget)."""
    if budget_gib is None or device.type != "cuda":
        yield
        return
    from ..memory.budget import emulate_budget

    release_cached_memory(device)
    emulate_budget(budget_gib, device)
    try:
        yield
    finally:
        emulate_budget(None, device)
