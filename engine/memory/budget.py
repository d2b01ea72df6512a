"""The memory a process may use on a GPU: the card's, or a smaller card's emulated by capping the allocator."""

from __future__ import annotations

from ..errors import ConfigError
from .planner import GIB

_BUDGETS: dict[int, float] = {}


def emulate_budget(vram_gib: float | None, device=None) -> None:
    """Cap this process's CUDA allocator at `vram_gib` GiB (torch.cuda.set_per_process_memory_fraction), as if
    the card had that much memory; None lifts the cap. The planner's budget checks and the out-of-memory
    advice use the capped figure."""
    import torch

    device = torch.device(device or "cuda")
    index = device.index if device.index is not None else torch.cuda.current_device()
    total_gib = torch.cuda.get_device_properties(index).total_memory / GIB
    if vram_gib is None:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
        _BUDGETS.pop(index, None)
        return
    if not 0 < vram_gib <= total_gib:
        raise ConfigError(f"budget {vram_gib:g} GiB is outside 0..{total_gib:.1f} GiB, this card's memory")
    torch.cuda.set_per_process_memory_fraction(vram_gib / total_gib, index)
    _BUDGETS[index] = vram_gib


def budget_gib(device) -> float:
    """The memory this process may use on `device`: an emulated budget, else the card's total."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _BUDGETS:
        return _BUDGETS[index]
    return torch.cuda.get_device_properties(index).total_memory / GIB
