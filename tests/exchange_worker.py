"""One rank of engine.parallel.exchange's attention on random tensors (started by tests/test_parallel_exchange.py
through torchrun, gloo). Every rank makes the same q, k, v for the whole sequence (seeded), keeps its share in
torch.tensor_split's order, attends through SequenceShards and writes its output share; the test compares the shares
with one SDPA over the whole sequence."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from engine.parallel.exchange import SequenceShards, split_sizes


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ulysses", type=int, required=True)
    parser.add_argument("--ring", type=int, default=1)
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=37)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(0)
    # [B, H, L, D] views over [B, L, H, D] memory, as the engine's qk_norm_rope hands them over
    qkv = [torch.randn(2, args.tokens, args.heads, 16, generator=generator).transpose(1, 2) for _ in range(3)]
    shards = SequenceShards.create(rank, args.ulysses, args.ring, args.chunks)
    shards.lengths = split_sizes(args.tokens, size)
    mine = [t.tensor_split(size, dim=2)[rank] for t in qkv]
    out = shards.attention(torch.nn.functional.scaled_dot_product_attention, *mine)  # [B, L_share, H*D]
    torch.save(out, Path(args.out) / f"share{rank}.pt")
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps({"exchanges": shards.exchanges}))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
