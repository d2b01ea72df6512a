"""Context parallelism: one image on several GPUs (torchrun, torch.distributed: NCCL on GPUs, gloo on CPUs).

`EngineConfig(parallel=ParallelConfig(ulysses=N, ring=M))`: config.py (no torch) defines it; apply.py installs it on a
pipeline (text encoders once and broadcast, the transformer's tokens split, the VAE decode split by tiles);
exchange.py is the attention over the split sequence; sequence.py the split and gather of the transformer's inputs
and output; runtime.py the process group. Names load on first use, so importing the config stays light.
"""

from __future__ import annotations

from importlib import import_module

from .config import ParallelConfig, parallel_for

_LAZY = {
    "apply_parallel": ".apply",
    "remove_parallel": ".apply",
    "with_parallel": ".apply",
    "ParallelState": ".apply",
    "init_distributed": ".runtime",
    "multicast_off": ".runtime",
    "World": ".runtime",
    "MULTICAST_OFF": ".runtime",
}

__all__ = ["ParallelConfig", "parallel_for", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
