"""Attention over a sequence split across ranks: Ulysses (all-to-all, heads for tokens) and ring (keys and values
all-gathered), around any attention core (our flash attention or SDPA), for shares of any length.

Each rank holds a share of the joint sequence (text and image tokens, split by `torch.tensor_split` order, so shares
differ by at most one token). The shares' lengths are set per forward by the split hook (engine/parallel/sequence.py)
on the SequenceShards object, so the collectives use exact, uneven split sizes: no padded tokens, no masks, no host
synchronisation to learn the sizes, and a captured CUDA graph holds the sizes of its own input signature.

Under Ulysses, the engine's blocks hand q, k and v over already in the exchange's send layout (the QK-norm + RoPE
kernel writes them so: flux_kernels.qk_norm_rope.qk_norm_rope_grouped) and take the output back in the layout it
arrives in (unpack_heads: inside a compiled region, inductor writes that permutation in the kernel that reads the
output next, or in one copy kernel of its own before an opaque op; eagerly, a torch copy): no strided copies of
their own, which on two H200s at 2048^2 were 20 ms of a 311 ms step (benchmarks/NOTES.md, 2026-11-29 19:14).

Attention is invariant to the order of the keys, and each query's output goes back to the rank that owns it, so
tokens may travel in any order as long as keys and values travel together: the result equals one GPU's attention
up to the cores' own summation order.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


def split_sizes(length: int, parts: int) -> list[int]:
    """The lengths `torch.tensor_split(x, parts)` gives: the first `length % parts` shares one longer."""
    base, extra = divmod(length, parts)
    return [base + 1] * extra + [base] * (parts - extra)


@dataclass
class SequenceShards:
    """The process groups of a ulysses x ring layout and the current shares of the sequence.

    Rank r = ring_index * ulysses + ulysses_index: a Ulysses group is `ulysses` consecutive ranks, a ring group the
    ranks with one ulysses_index.
    """

    rank: int
    ulysses: int
    ring: int
    ulysses_group: object = None
    ring_group: object = None
    chunks: int = 2  # slices of the heads whose exchanges overlap the attention of others (ParallelConfig.chunks)
    lengths: list[int] = field(default_factory=list)  # tokens on each rank (text + image share), set per forward
    exchanges: int = 0  # attention calls that went through the exchange (tests count them)

    @classmethod
    def create(
        cls,
        rank: int,
        ulysses: int,
        ring: int,
        chunks: int = 2,
        timeout_s: float | None = None,
        high_priority: bool = False,
    ) -> SequenceShards:
        """Make the groups; every rank must call this, in the same order (dist.new_group is collective). timeout_s:
        their collectives' timeout (None: torch's default, 10 min on NCCL, 30 on gloo). high_priority: on NCCL, the
        groups' streams at high priority (ParallelConfig.comm_priority); CUDA graphs keep a kernel's captured
        priority (torch instantiates them with per-node priorities)."""
        shards = cls(rank=rank, ulysses=ulysses, ring=ring, chunks=chunks)
        timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
        options = nccl_options(high_priority)
        for ring_index in range(ring):
            ranks = [ring_index * ulysses + u for u in range(ulysses)]
            group = dist.new_group(ranks, timeout=timeout, pg_options=options)
            if ring_index == rank // ulysses:
                shards.ulysses_group = group
        for ulysses_index in range(ulysses):
            ranks = [r * ulysses + ulysses_index for r in range(ring)]
            group = dist.new_group(ranks, timeout=timeout, pg_options=options)
            if ulysses_index == rank % ulysses:
                shards.ring_group = group
        return shards

    def destroy(self) -> None:
        """Destroy the process groups `create` made (every rank must call this, as with create)."""
        for group in {id(g): g for g in (self.ulysses_group, self.ring_group) if g is not None}.values():
            dist.destroy_process_group(group)
        self.ulysses_group = self.ring_group = None

    @property
    def ring_index(self) -> int:
        return self.rank // self.ulysses

    def attention(self, core: Callable, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """core(q, k, v) over the whole sequence for this rank's tokens. q, k, v: [B, H, L_local, D] (any strides,
        last one 1) -> [B, L_local, H * D]. Under Ulysses, q, k and v are first copied into the exchange's layout
        (grouped_layout); callers that can write that layout directly call grouped_attention instead."""
        batch, heads, tokens, head_dim = query.shape
        self._check_share(tokens)
        padded_heads = math.ceil(heads / self.ulysses) * self.ulysses
        qkv = [query, key, value]
        if padded_heads != heads:  # empty heads: zero queries, keys and values; their outputs are dropped
            qkv = [torch.nn.functional.pad(t, (0, 0, 0, 0, 0, padded_heads - heads)) for t in qkv]
        if self.ulysses == 1:
            self.exchanges += 1
            out = self._attend(core, *qkv).transpose(1, 2)  # [B, L_local, H, D]
            return out[:, :, :heads].reshape(batch, tokens, heads * head_dim)
        from flux_kernels.qk_norm_rope import pack_heads

        groups, slices = self.grouped_layout(padded_heads)
        back = self.grouped_attention(core, pack_heads(*qkv, groups, slices))
        out = unpack_heads(back).unflatten(-1, (padded_heads, head_dim))  # [B, L_local, H_padded, D]
        return out[:, :, :heads].reshape(batch, tokens, heads * head_dim)

    def grouped_layout(self, heads: int) -> tuple[int, int]:
        """(groups, slices) of the Ulysses exchange of `heads` heads (which the Ulysses degree divides): rank j of the
        group attends over heads [j H/u, (j+1) H/u), sent in at most `chunks` slices of equal size (the most that
        divide its heads: 6 heads a rank and chunks 4 make 3 slices)."""
        if heads % self.ulysses:
            raise ValueError(
                f"{heads} heads do not split over a Ulysses degree of {self.ulysses}; the grouped layout needs a "
                f"degree that divides the heads (one of {[d for d in range(1, heads + 1) if heads % d == 0]}); other "
                "degrees take SequenceShards.attention, which pads the heads"
            )
        group_heads = heads // self.ulysses
        return self.ulysses, max(d for d in range(1, min(self.chunks, group_heads) + 1) if group_heads % d == 0)

    def grouped_attention(self, core: Callable, packed: torch.Tensor) -> torch.Tensor:
        """Ulysses: heads for tokens and back, pipelined over the slices of each rank's heads: the exchange of one
        slice runs (on NCCL's stream) while attention computes another, and the return of the first slice's output
        while the second computes. packed: q, k, v in the layout of flux_kernels.qk_norm_rope.qk_norm_rope_grouped,
        [C, u, L_local, 3, B, H'', D] (slice s of group j: this rank's tokens of the heads rank j attends over,
        contiguous, so it is sent as it is) -> the output in the same grouping, [C, u, L_local, B, H'', D]
        (unpack_heads: [B, L_local, H * D]). Measured on 2 H200s, a ready exchange kernel waits for the attention
        grid beside it to drain, so the overlap is smaller than meant (benchmarks/NOTES.md 2026-11-30 11:45)."""
        slices, groups, tokens, _, batch, slice_heads, head_dim = packed.shape
        if groups != self.ulysses:
            raise RuntimeError(
                f"q, k, v were packed in {groups} head groups for a Ulysses degree of {self.ulysses}; pack them with "
                "groups, slices = grouped_layout(heads) of this SequenceShards"
            )
        self._check_share(tokens)
        self.exchanges += 1
        group_lengths = self.lengths[self.ring_index * self.ulysses : (self.ring_index + 1) * self.ulysses]
        incoming = []
        for send in packed:  # [u, L_local, 3, B, H'', D]: the part for rank j contiguous, split sizes in rows
            received = packed.new_empty(sum(group_lengths), 3, batch, slice_heads, head_dim)
            work = dist.all_to_all_single(
                received, send.view(groups * tokens, 3, batch, slice_heads, head_dim),
                output_split_sizes=group_lengths, input_split_sizes=[tokens] * groups,
                group=self.ulysses_group, async_op=True,
            )  # fmt: skip
            incoming.append((work, received))
        back = packed.new_empty(slices, groups * tokens, batch, slice_heads, head_dim)
        returning = []
        for (work, received), slot in zip(incoming, back, strict=True):
            work.wait()  # the compute stream waits for this slice (the host does not, on GPUs)
            query, key, value = received.permute(1, 2, 3, 0, 4)  # [B, H'', L_group, D] each
            out = self._attend(core, query, key, value).permute(2, 0, 1, 3).contiguous()  # [L_group, B, H'', D]
            returning.append(dist.all_to_all_single(
                slot, out, output_split_sizes=[tokens] * groups, input_split_sizes=group_lengths,
                group=self.ulysses_group, async_op=True,
            ))  # fmt: skip
        for work in returning:
            work.wait()
        return back.view(slices, groups, tokens, batch, slice_heads, head_dim)

    def _check_share(self, tokens: int) -> None:
        if not self.lengths or self.lengths[self.rank] != tokens:
            raise RuntimeError(
                f"rank {self.rank} attends over {tokens} tokens but its share is "
                f"{self.lengths[self.rank] if self.lengths else 'unset'}: the transformer was called without the "
                "context-parallel split hook (engine.parallel)"
            )

    def _attend(self, core: Callable, query, key, value) -> torch.Tensor:
        """core over this rank's queries and the keys and values of its whole ring ([B, H', L_group, D] each)."""
        if self.ring == 1:
            return core(query, key, value)
        kv = self._gather_ring(torch.stack([key, value]))  # [2, B, H', L, D]
        return core(query, kv[0], kv[1])

    def _gather_ring(self, kv: torch.Tensor) -> torch.Tensor:
        """Keys and values of every ring member: [2, B, H', L_group, D] -> [2, B, H', L, D]. Members' shares differ
        by a few tokens: each is padded to the longest, all-gathered, and the padding dropped."""
        member_lengths = [
            sum(self.lengths[r * self.ulysses : (r + 1) * self.ulysses]) for r in range(self.ring)
        ]  # tokens per ring member's Ulysses group
        longest = max(member_lengths)
        mine = kv.permute(3, 0, 1, 2, 4)  # [L_group, 2, B, H', D]
        if mine.shape[0] < longest:
            mine = torch.nn.functional.pad(mine, (0, 0, 0, 0, 0, 0, 0, 0, 0, longest - mine.shape[0]))
        mine = mine.contiguous()
        gathered = [torch.empty_like(mine) for _ in range(self.ring)]
        dist.all_gather(gathered, mine, group=self.ring_group)
        whole = torch.cat([part[:length] for part, length in zip(gathered, member_lengths, strict=True)])
        return whole.permute(1, 2, 3, 0, 4)  # [2, B, H', L, D]


def nccl_options(high_priority: bool):
    """The new groups' backend options: NCCL's with high-priority streams when asked and the default group runs
    NCCL, else None (torch's defaults; gloo has no stream priorities)."""
    if not high_priority or dist.get_backend() != "nccl":
        return None
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = True
    return options


def unpack_heads(back: torch.Tensor) -> torch.Tensor:
    """grouped_attention's output [C, u, L, B, H'', D] -> [B, L, H * D] in the heads' order (h = (j C + c) H'' + i).
    A copy; inside a compiled region inductor writes it in the kernel that reads the result next."""
    slices, groups, tokens, batch, slice_heads, head_dim = back.shape
    return back.permute(3, 2, 1, 0, 4, 5).reshape(batch, tokens, groups * slices * slice_heads * head_dim)


# ----------------------------------------------------------------------------- the op compiled regions call

# SequenceShards by id: a custom op's arguments are tensors and scalars, so the op finds its layout by number (one
# per process in practice; the id is a constant of the compiled graph, the same on every rank)
_SHARDS: dict[int, SequenceShards] = {}
_SHARDS_IDS = itertools.count()  # never reused: a compiled graph of a removed layout must not find another's
_CORES: dict[str, Callable] = {}


def register_shards(shards: SequenceShards) -> int:
    key = next(_SHARDS_IDS)
    _SHARDS[key] = shards
    return key


def unregister_shards(key: int) -> None:
    _SHARDS.pop(key, None)


def _core(name: str) -> Callable:
    if name not in _CORES:
        if name == "triton":
            from flux_kernels.flash_attention import flash_attention

            _CORES[name] = flash_attention
        else:
            _CORES[name] = torch.nn.functional.scaled_dot_product_attention
    return _CORES[name]


@torch.library.custom_op("flux_engine::context_parallel_attention", mutates_args=())
def context_parallel_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, shards_id: int, core: str
) -> torch.Tensor:
    """Attention of this rank's tokens over the whole split sequence: [B, H, L_local, D] x3 -> [B, L_local, H*D].
    Opaque to torch.compile (the collectives and the per-forward split sizes stay outside the traced graph)."""
    return _SHARDS[shards_id].attention(_core(core), query, key, value)


@context_parallel_attention.register_fake
def _(query, key, value, shards_id, core):
    batch, heads, tokens, head_dim = query.shape
    return query.new_empty(batch, tokens, heads * head_dim)


@torch.library.custom_op("flux_engine::context_parallel_grouped_attention", mutates_args=())
def context_parallel_grouped_attention(packed: torch.Tensor, shards_id: int, core: str) -> torch.Tensor:
    """SequenceShards.grouped_attention as an op opaque to torch.compile: q, k, v packed by
    qk_norm_rope_grouped [C, u, L_local, 3, B, H'', D] -> the output [C, u, L_local, B, H'', D] (unpack_heads)."""
    return _SHARDS[shards_id].grouped_attention(_core(core), packed)


@context_parallel_grouped_attention.register_fake
def _(packed, shards_id, core):
    slices, groups, tokens, _, batch, slice_heads, head_dim = packed.shape
    return packed.new_empty(slices, groups, tokens, batch, slice_heads, head_dim)
