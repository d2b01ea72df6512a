"""One rank of a context-parallel run of the tiny model, started by tests/test_parallel.py through torchrun.

Rank 0 saves what the engine returned (the image tensor) and every rank its own facts (what the call returned,
how many attention calls went through the exchange, or the error the call raised and after how long) to --out;
--fail-rank makes that rank raise before its call, --hang-rank makes it sleep past the timeout instead, as a crashed
or stuck GPU would. --restore: after the parallel call, engine.restore(pipe) and a plain call on every rank, rank r
seeded with r (its image saved as restored{r}.pt): what a single process makes, if nothing of the split is left.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton loads: the kernels run in its interpreter on CPUs

import torch  # noqa: E402

from engine import FluxEngine, preset, restore  # noqa: E402
from engine.config import CompileConfig  # noqa: E402
from engine.parallel import ParallelConfig  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="baseline")
    parser.add_argument("--ulysses", type=int, default=1)
    parser.add_argument("--ring", type=int, default=1)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--compile", default="", help="a compile backend (eager, aot_eager): regional compile")
    parser.add_argument("--vae-tile", type=int, default=0, help="VAE tiles of this many pixels (0: untiled)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--hang-rank", type=int, default=-1)
    parser.add_argument("--hang-in-attention", type=int, default=-1, help="that rank sleeps in its first attention")
    parser.add_argument("--rank-height", default="", help="RANK:HEIGHT: that rank calls with another height")
    parser.add_argument("--rank-guidance", default="", help="RANK:SCALE: that rank calls with another guidance")
    parser.add_argument("--restore", action="store_true", help="then restore the pipeline and call it again")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    config = preset(args.preset)
    config = replace(config, parallel=ParallelConfig(ulysses=args.ulysses, ring=args.ring, timeout_s=args.timeout))
    if args.compile:
        config = replace(config, compile=CompileConfig(mode="regional", backend=args.compile))
    if args.vae_tile:
        from engine.config import VaeConfig

        config = replace(config, vae=VaeConfig(tiling="on", tile=args.vae_tile, overlap=16))
    rank = int(os.environ.get("RANK", "0"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    context = _kernels_context(config)
    with context:
        pipe = FluxEngine.from_pretrained("synthetic:tiny", config=config, device="cpu", dtype=dtype)
        if max(args.fail_rank, args.hang_rank) >= 0:
            # the ranks leave together, so the others are in their calls' collectives when this one fails: torchrun
            # ends them ~2 s after a rank exits, which would race a rank still on its way to the call
            torch.distributed.barrier()
        if rank == args.fail_rank:
            raise RuntimeError(f"rank {rank} fails on purpose (--fail-rank)")
        if rank == args.hang_rank:
            time.sleep(args.timeout * 3)
        if rank == args.hang_in_attention:  # past the call's first collectives, inside the exchange's own groups
            shards = pipe.parallel_state.shards
            for name in ("attention", "grouped_attention"):  # q, k, v as they are, or packed by the QK-norm
                attend = getattr(shards, name)
                setattr(shards, name, lambda *a, attend=attend: (time.sleep(args.timeout * 3), attend(*a))[1])
        height = args.height
        if args.rank_height and int(args.rank_height.split(":")[0]) == rank:
            height = int(args.rank_height.split(":")[1])
        guidance = 3.5
        if args.rank_guidance and int(args.rank_guidance.split(":")[0]) == rank:
            guidance = float(args.rank_guidance.split(":")[1])
        call = {
            "prompt": "a red fox in the snow",
            "width": args.width,
            "num_inference_steps": args.steps,
            "guidance_scale": guidance,
            "max_sequence_length": args.text_tokens,
            "output_type": "pt",
        }
        out = Path(args.out)
        state = pipe.parallel_state
        facts = {"rank": rank, "steps": pipe.engine_steps.names()}
        # each rank its own seed: the image equals the single process's (seed 0) only if rank 0's latents are shared
        seed = rank if args.ulysses * args.ring > 1 else 0
        started = time.perf_counter()
        try:
            output = pipe(height=height, generator=torch.Generator().manual_seed(seed), **call)
        except Exception as err:
            facts.update(error=type(err).__name__, message=str(err), seconds=time.perf_counter() - started)
            _write_facts(out, facts)
            raise
        facts.update(
            returned=None if output is None else type(output).__name__,
            exchanges=state.shards.exchanges if state is not None else 0,
            exchange_groups=_exchange_groups(pipe),
            seconds=time.perf_counter() - started,
        )
        if output is not None:
            torch.save(output.images.float().cpu(), out / "image.pt")
        if args.restore:
            restore(pipe)
            restored = pipe(height=height, generator=torch.Generator().manual_seed(rank), **call)
            torch.save(restored.images.float().cpu(), out / f"restored{rank}.pt")
            facts.update(
                steps_after_restore=pipe.engine_steps.names() if pipe.engine_steps is not None else [],
                exchanges_after_restore=state.shards.exchanges if state is not None else 0,
            )
    _write_facts(out, facts)
    return 0


def _exchange_groups(pipe):
    """The (groups, slices) the engine's blocks write q, k, v in for the exchange; None without the engine's blocks
    (a preset without the attention step) or without a grouped exchange."""
    ops = getattr(pipe.transformer.transformer_blocks[0], "flux_ops", None)
    return None if ops is None else ops.exchange_groups


def _write_facts(out: Path, facts: dict) -> None:
    (out / f"rank{facts['rank']}.json").write_text(json.dumps(facts))


def _kernels_context(config):
    """Our Triton kernels run in the interpreter on CPUs, inside the fixes the tests use."""
    if not config.attention.needs_triton:
        return _Nothing()
    import flux_kernels

    return flux_kernels.interpreter_fixes()


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
