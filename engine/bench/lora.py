"""engine.bench --lora PATH|synthetic:RANK: the same adapter on diffusers' pipeline and on every engine config (each
config measured first without it, in the same process: the adapter's cost), and the time a hot-swap of it takes
(from a local file, in the page cache after the first load), with the graphs compiled and the CUDA graphs captured
by the swap and the call after it."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import EngineError
from .arguments import SYNTHETIC_LORA as SYNTHETIC

ADAPTER = "bench"


@dataclass(frozen=True)
class LoraSource:
    label: str  # what --lora said
    path: Path  # a local .safetensors file (a synthetic adapter is written to a temporary one)
    rank: int


def prepare_lora(text: str, components: dict, seed: int) -> LoraSource:
    """The adapter --lora names, as a local file: synthetic:RANK is made for this transformer (engine.lora)."""
    from ..lora import synthetic_lora
    from ..lora_calls import lora_rank

    if text.startswith(SYNTHETIC):
        from safetensors.torch import save_file

        rank = int(text[len(SYNTHETIC) :])
        path = Path(tempfile.mkdtemp(prefix="flux-engine-lora-")) / f"synthetic-r{rank}.safetensors"
        save_file(synthetic_lora(components["transformer"], rank, seed=seed), str(path))
        return LoraSource(text, path, rank)
    rank = lora_rank(text)
    if rank is None:
        raise EngineError(f"--lora {text!r}: no lora_A / lora_down factors found in the file; is it a LoRA?")
    return LoraSource(text, Path(text), rank)


def attach(pipe, lora: LoraSource) -> None:
    """Load the adapter on `pipe` (prepared for hot-swaps up to its rank first, where the pipeline has the call)."""
    if hasattr(pipe, "enable_lora_hotswap"):
        pipe.enable_lora_hotswap(target_rank=lora.rank)
    from ..lora_calls import load_lora_file

    load_lora_file(pipe, lora.path, adapter_name=ADAPTER)


def swap_seconds(pipe, lora: LoraSource, device: torch.device) -> float:
    """The same adapter swapped in again (load_lora_weights(..., hotswap=True)): seconds until the pipeline is ready."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    pipe.load_lora_weights(str(lora.path), adapter_name=ADAPTER, hotswap=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def note_lora(row, lora: LoraSource | None, without) -> None:
    """The row's adapter, and the same config's figures before it was loaded (`without`: that row)."""
    if lora is None:
        return
    row.lora = lora.label
    if without is not None and not without.error:
        row.lora_off_ms_per_step, row.lora_off_peak_gib = without.ms_per_step, without.peak_allocated_gib


def measure_swap(pipe, lora: LoraSource, row, args, device: torch.device, graph_count) -> None:
    """A hot-swap of the adapter at the row's size: its seconds to ready, then one call (warm-up steps), and the
    graphs compiled (`graph_count()`, torch.compile's) and CUDA graphs captured by both."""
    graphs = getattr(getattr(pipe, "compile_state", None), "cuda_graphs", None)
    captures, compiled = (graphs.captures if graphs is not None else 0), graph_count()
    row.lora_swap_s = swap_seconds(pipe, lora, device)
    pipe(
        prompt=[args.prompt] * args.batch, height=row.height, width=row.width, num_inference_steps=args.warmup_steps,
        guidance_scale=args.guidance, generator=torch.Generator().manual_seed(args.seed),
        max_sequence_length=args.max_sequence_length, output_type="latent",
    )  # fmt: skip
    row.lora_swap_recompiles = graph_count() - compiled
    row.lora_swap_captures = (graphs.captures if graphs is not None else 0) - captures
