"""engine.parallel.exchange on gloo processes: Ulysses (heads padded or not, pipelined in slices or not), ring and
both, over uneven shares, against one attention over the whole sequence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.parallel.exchange import split_sizes
from engine.parallel.runtime import MULTICAST_OFF

WORKER = Path(__file__).with_name("exchange_worker.py")
HEADS, TOKENS = 8, 37  # 37 tokens: no rank count used here divides them, so the shares are uneven


def _run(tmp_path: Path, ranks: int, ulysses: int, ring: int, chunks: int, heads: int = HEADS) -> list[torch.Tensor]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", str(WORKER),
        f"--ulysses={ulysses}", f"--ring={ring}", f"--chunks={chunks}", f"--heads={heads}", f"--tokens={TOKENS}",
        f"--out={tmp_path}",
    ]  # fmt: skip
    env = {**os.environ, **MULTICAST_OFF, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in range(ranks):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text())["exchanges"] == 1
    return [torch.load(tmp_path / f"share{rank}.pt") for rank in range(ranks)]


def _whole(heads: int = HEADS) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, TOKENS, heads, 16, generator=generator).transpose(1, 2) for _ in range(3))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # [B, H, L, D]
    return out.transpose(1, 2).reshape(2, TOKENS, heads * 16)


@pytest.mark.parametrize(
    "ranks, ulysses, ring, chunks, heads",
    [
        (2, 2, 1, 2, HEADS),  # Ulysses, each rank's 4 heads in 2 pipelined slices
        (2, 2, 1, 1, HEADS),  # Ulysses in one exchange
        (3, 3, 1, 2, HEADS),  # 8 heads over 3 ranks: padded to 9; 3 per rank do not split in 2, so one exchange
        (2, 2, 1, 3, HEADS),  # 4 heads a rank in at most 3 slices: 2 slices of 2
        (2, 1, 2, 2, HEADS),  # ring alone
        (4, 2, 2, 2, HEADS),  # both: Ulysses pairs, keys and values all-gathered across the pairs
    ],
)
def test_exchange_equals_attention_over_the_whole_sequence(tmp_path, ranks, ulysses, ring, chunks, heads):
    shares = _run(tmp_path, ranks, ulysses, ring, chunks, heads)
    assert [share.shape[1] for share in shares] == split_sizes(TOKENS, ranks)
    # fp32: the only differences are the order of the keys (each rank's share travels in rank order) and SDPA's own
    # blocking over other lengths: rounding, ~1e-7 measured
    torch.testing.assert_close(torch.cat(shares, dim=1), _whole(heads), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "ulysses, chunks, slices",
    [(2, 2, 2), (2, 4, 4), (4, 4, 3), (2, 5, 4), (8, 2, 1), (2, 1, 1), (2, 12, 12), (2, 30, 12)],
)
def test_grouped_layout_takes_the_most_equal_slices_up_to_chunks(ulysses, chunks, slices):
    """FLUX's 24 heads: a rank's 24 / ulysses heads in the most equal slices that `chunks` allows."""
    from engine.parallel.exchange import SequenceShards

    shards = SequenceShards(rank=0, ulysses=ulysses, ring=1, chunks=chunks)
    assert shards.grouped_layout(24) == (ulysses, slices)


def test_grouped_layout_refuses_a_degree_that_does_not_divide_the_heads():
    from engine.parallel.exchange import SequenceShards

    with pytest.raises(ValueError, match=r"24 heads do not split over a Ulysses degree of 5.*one of \[1, 2, 3, 4, 6"):
        SequenceShards(rank=0, ulysses=5, ring=1).grouped_layout(24)
