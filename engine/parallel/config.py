"""ParallelConfig: how one image's work is split over several GPUs (context parallelism; no torch import here)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

# FLUX.1's joint attention has 24 heads: Ulysses degrees that divide them need no padded heads
FLUX_HEADS = 24
COMM_PRIORITIES = ("high", "normal")


@dataclass(frozen=True)
class ParallelConfig:
    """Context parallelism over `ulysses * ring` processes (one per GPU, started by torchrun), engine/parallel/.

    Every rank holds the whole model; the transformer's joint sequence (text and image tokens) is split across the
    ranks, each rank running every block on its share of the tokens.
    ulysses: ranks that trade heads for tokens by all-to-all before attention (and back after it): each attends
        over the whole sequence with 1/ulysses of the heads. Best on one machine's NVLink. Head counts that it does
        not divide are padded with empty heads (FLUX's 24 heads: 2, 3, 4, 6, 8 need none).
    ring: groups of ranks that also share keys and values (all-gathered), each attending with its own queries over
        all of them: for degrees past the head count, or to keep all-to-alls inside a machine.
    timeout_s: a collective that waits longer than this (a rank failed or hangs) ends the run with an error.
    chunks: Ulysses exchanges each rank's heads in at most this many slices, so that one slice travels while
        attention computes another (1: one exchange, no overlap); the most equal slices of the rank's heads up to
        this count (12 heads a rank: 4 slices of 3; 6 heads a rank: 3 slices of 2). Measured on 2 H200s, the exchange
        of one slice waits for the attention kernel beside it to drain instead of overlapping it (NOTES 2026-11-30
        11:45): the slices pay off less than they were meant to.
    comm_priority: "normal" (default): torch's default NCCL streams; "high": the exchanges on high-priority streams,
        so that a ready exchange takes SMs as the attention kernel beside it frees them instead of waiting for its
        whole grid (the 2-GPU timeline showed every exchange waiting so). Measured on 2 H200s at 2048^2: no faster
        (308.3 ms a step against 306.0; benchmarks/NOTES.md 2026-11-30 11:45), so it stays off. NCCL only.
    """

    ulysses: int = 1
    ring: int = 1
    timeout_s: float = 600.0
    chunks: int = 2
    comm_priority: str = "normal"

    def __post_init__(self):
        for name in ("ulysses", "ring", "chunks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"parallel.{name}={value!r} must be an integer >= 1 (ulysses, ring 1: that split is off; "
                    "chunks 1: no overlap)"
                )
        if self.comm_priority not in COMM_PRIORITIES:
            raise ConfigError(
                f"parallel.comm_priority={self.comm_priority!r} is not one of {', '.join(COMM_PRIORITIES)} "
                "(normal: torch's default streams, the default; high: the exchanges' NCCL streams at high priority)"
            )
        timeout = self.timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < float("inf"):
            raise ConfigError(f"parallel.timeout_s={self.timeout_s!r} must be a number of seconds > 0 (default 600)")

    @property
    def degree(self) -> int:
        """The number of processes (GPUs) this config runs on."""
        return self.ulysses * self.ring

    @property
    def enabled(self) -> bool:
        return self.degree > 1

    @property
    def label(self) -> str:
        if not self.enabled:
            return ""
        parts = [f"u{self.ulysses}" if self.ulysses > 1 else "", f"r{self.ring}" if self.ring > 1 else ""]
        overlap = f"c{self.chunks}" if self.chunks != 2 and self.ulysses > 1 else ""
        priority = "" if self.comm_priority == "normal" else f"-{self.comm_priority}"
        return "cp=" + "".join(parts) + overlap + priority


def parallel_for(gpus: int) -> ParallelConfig:
    """The config for `gpus` GPUs: Ulysses over all of them when it divides FLUX's 24 heads (the all-to-alls stay
    on one machine's NVLink); else Ulysses over the largest common divisor and ring across the rest (16 GPUs: u8 x
    r2), so no head is padded; a count that shares no divisor with 24 (5, 7) pads the heads instead."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ConfigError(f"gpus={gpus!r} must be an integer >= 1")
    common = max(d for d in range(1, min(gpus, FLUX_HEADS) + 1) if gpus % d == 0 and FLUX_HEADS % d == 0)
    if common in (1, gpus):
        return ParallelConfig(ulysses=gpus)
    return ParallelConfig(ulysses=common, ring=gpus // common)
