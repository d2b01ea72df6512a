"""Flash-attention forward (non-causal, no mask) for FLUX's joint text+image attention.

Fuses: S = QK^T, online softmax (exp2, with scale * log2(e) riding in the FMA that subtracts the running max,
so folding it into q would save no instruction and cost a rounding; fp32 running max/sum/accumulator),
O = PV, and the output transpose: O is written as [B, Lq, H, D] memory (returned as a [B, H, Lq, D] view), so
the caller's `out.transpose(1, 2).reshape(B, Lq, H * D)` is free.
Tuned for: B=1, H=24, D=128, bf16, L = 1536 / 4608 / 16896 (FLUX 512^2 / 1024^2 / 2048^2 with 512 text
tokens) on H100. Q, K, V tiles move through tensor descriptors (TMA on Hopper, plain loads before it); the
loop over full key blocks is unmasked, only the last, partial block is masked.
No warp specialisation: Triton 3.6's automatic warp specialisation crashed on this kernel on H100 for every
config (NVGPUWarpSpecialization pass failure / dominance assertion), so those configs were removed; the tile
shapes below get their overlap from occupancy instead (see _HOPPER_CONFIGS).
Limits: forward only; head_dim 64 or 128; bf16/fp16; any B, H >= 1 and Lq, Lk >= 1 (tails are masked);
inputs of any strides with stride(-1) == 1 (16-byte aligned rows are used in place, others are copied once).
Measured (H100 80GB HBM3, 2026-11-26, benchmarks/results/attention-h100-80gb-hbm3-20261126-1800.json; CUDA-graph
device time): 301 / 472 / 522 TFLOP/s at L = 1536 / 4608 / 16896 (540 with q, k, v as views of one qkv
tensor at 16896); cuDNN SDPA 456 / 587 / 643, torch.compile of attention_ref 459 / 592 / 643. Not yet at
SDPA: that needs the softmax of one tile to overlap the MMA of another inside a CTA (FA3's ping-pong).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from flux_kernels import check_runnable, device_guard, new_output, triton_interpreting
from flux_kernels.tuning import TunedLaunch

try:  # private: lets the launcher see whether the process already installed a Triton allocator
    from triton.runtime import _allocation
except ImportError:  # moved: install ours unconditionally
    _allocation = None

HEAD_DIMS = (64, 128)
DTYPES = (torch.bfloat16, torch.float16)

# ----------------------------------------------------------------------------- reference


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None, upcast: bool = True
) -> torch.Tensor:
    """softmax(Q K^T * scale) V, plainly. q: [B, H, Lq, D], k, v: [B, H, Lk, D] -> [B, H, Lq, D].

    upcast=True computes in fp32 and returns fp32 (the accuracy yardstick); upcast=False stays in the input
    dtype throughout (what a same-dtype PyTorch implementation gets).
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # [B, H, Lq, Lk]
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v)


# ----------------------------------------------------------------------------- kernel


@triton.jit
def _softmax_pv(acc, l_i, m_i, qk, desc_v, start_n, Lk, qk_scale, BLOCK_N: tl.constexpr, MASK_TAIL: tl.constexpr):
    # One key block's online-softmax update. qk: raw scores S_j [BLOCK_M, BLOCK_N] fp32; m_i in log2 units.
    if MASK_TAIL:
        # keys past Lk load as zeros (the descriptor pads); their scores must be -inf, not 0
        qk = tl.where((start_n + tl.arange(0, BLOCK_N))[None, :] < Lk, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # scale > 0, so max(S) * scale = max(S * scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])  # one FMA + exp2 per score
    acc = acc * alpha[:, None]
    l_i = l_i * alpha + tl.sum(p, 1)
    v = desc_v.load([start_n, 0])  # [BLOCK_N, D]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _full_blocks(acc, l_i, m_i, q, desc_k, desc_v, full_end, Lk, qk_scale, BLOCK_N: tl.constexpr):
    # Key blocks [0, full_end), none masked.
    for start_n in tl.range(0, full_end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = desc_k.load([start_n, 0])  # [BLOCK_N, D]
        qk = tl.dot(q, k.T)  # [BLOCK_M, BLOCK_N], fp32
        acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, desc_v, start_n, Lk, qk_scale, BLOCK_N, False)
    return acc, l_i, m_i


@triton.jit
def head_descriptor(base, rows, cols, row_stride, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """A tensor descriptor (TMA on Hopper) of one (batch, head)'s [rows, cols] matrix with unit column stride, read
    and written in [BLOCK_ROWS, BLOCK_COLS] tiles (past the shape: zero-filled on load, dropped on store)."""
    return tl.make_tensor_descriptor(
        base, shape=[rows, cols], strides=[row_stride, 1], block_shape=[BLOCK_ROWS, BLOCK_COLS]
    )


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Hopper (H100 sm90; both compile without spills, checked with cuobjdump). Without warp specialisation the wgmma
# of a tile does not overlap that tile's softmax: Triton 3.6 waits for every outstanding dot at once (even for a
# next-block QK^T issued before the softmax), so overlap has to come from occupancy:
# - 128 x 64, 4 warps, 2 stages: 96 KB of shared memory, 255 registers: two CTAs per SM, one's softmax beside
#   the other's MMA. Fastest at L = 4608 and 16896 (2026-11-26, H100).
# - 128 x 128, 8 warps (two warpgroups), 3 stages: 224 KB, 186 registers, one CTA per SM. Fastest at L = 1536.
# Measured and dropped (same run, autotuner timings vs the best config): 256 x 64 x 16 warps (four warpgroups,
# 11-35% slower); lazy rescaling, FA4's trick, as a block-uniform branch (its cross-warp reduction made it 6-45%
# slower); a software-pipelined loop issuing S_{j+1} before softmax_j (1-10% slower: Triton waits at once).
_HOPPER_CONFIGS = [
    _config(128, 64, 4, 2),
    _config(128, 128, 8, 3),
]
# Ampere/Ada: small tiles that fit ~100 KB of shared memory (sm86/sm89) and 164 KB (sm80).
_OLDER_CONFIGS = [
    _config(128, 64, 4, 2),
    _config(64, 64, 4, 3),
    _config(64, 32, 4, 2),
]
# The interpreter runs each program in numpy: one small config, and a single config skips the autotuner's
# timing runs altogether (it benchmarks even a pruned list of one). Tests also launch explicit tiles.
_INTERPRETER_CONFIGS = [_config(32, 32, 4, 1)]


def _device_major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def _prune_attention_configs(configs, named_args, **kwargs):
    # runs once per autotuning key, not per call
    args = {**named_args, **kwargs}
    major = _device_major(args["Q"].device)
    # sm90/sm100 have ~227 KB of shared memory per block; sm8x and consumer sm12x much less
    family = _HOPPER_CONFIGS if major in (9, 10) else _OLDER_CONFIGS
    family_ids = {id(config) for config in family}
    candidates = [c for c in configs if id(c) in family_ids and c.kwargs["BLOCK_N"] <= args["HEAD_DIM"]]
    # Q tiles taller than the query length only compute padding; keep them only if nothing smaller exists.
    fitting = [config for config in candidates if config.kwargs["BLOCK_M"] <= args["Lq"]]
    return fitting or candidates


@triton.autotune(
    configs=_INTERPRETER_CONFIGS if triton_interpreting() else _HOPPER_CONFIGS + _OLDER_CONFIGS,
    key=["Lq", "Lk", "HEAD_DIM"],
    prune_configs_by={"early_config_prune": _prune_attention_configs},
)
@triton.jit
def _flash_attention_fwd_kernel(
    Q,
    K,
    V,
    Out,
    softmax_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    H,
    Lq,
    Lk,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)

    # One 2-D descriptor per (batch, head): arbitrary batch/head/token strides, and rows past Lq / Lk are
    # zero-filled on load and dropped on store by the descriptor itself.
    desc_q = head_descriptor(Q + off_b * stride_qb + off_h * stride_qh, Lq, HEAD_DIM, stride_qm, BLOCK_M, HEAD_DIM)
    desc_k = head_descriptor(K + off_b * stride_kb + off_h * stride_kh, Lk, HEAD_DIM, stride_kn, BLOCK_N, HEAD_DIM)
    desc_v = head_descriptor(V + off_b * stride_vb + off_h * stride_vh, Lk, HEAD_DIM, stride_vn, BLOCK_N, HEAD_DIM)
    desc_o = head_descriptor(Out + off_b * stride_ob + off_h * stride_oh, Lq, HEAD_DIM, stride_om, BLOCK_M, HEAD_DIM)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = softmax_scale * 1.44269504  # exp(x) = exp2(x * log2(e))
    q = desc_q.load([start_m * BLOCK_M, 0])  # [BLOCK_M, D], stays on chip

    full_end = (Lk // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _full_blocks(acc, l_i, m_i, q, desc_k, desc_v, full_end, Lk, qk_scale, BLOCK_N)
    if full_end < Lk:  # the partial last key block: the only masked one
        k = desc_k.load([full_end, 0])
        qk = tl.dot(q, k.T)
        acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, desc_v, full_end, Lk, qk_scale, BLOCK_N, True)

    acc = acc / l_i[:, None]
    desc_o.store([start_m * BLOCK_M, 0], acc.to(Out.dtype.element_ty))


# ----------------------------------------------------------------------------- launcher

_launch_flash_attention = TunedLaunch(_flash_attention_fwd_kernel, tokens=(0, 1))


def _torch_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    # Global scratch for the tensor descriptors the kernel builds on the device (128 bytes each).
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_scratch_allocator() -> None:
    """Device-side tensor descriptors need a Triton allocator; install one backed by PyTorch's, unless the
    process (this context) already set its own."""
    if _allocation is not None:
        try:
            if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
                return
        except AttributeError:  # private API changed: set ours
            pass
    triton.set_allocator(_torch_scratch)


def _descriptor_ready(x: torch.Tensor) -> bool:
    """Tensor descriptors (TMA) need a 16-byte aligned base and 16-byte multiple strides on used dims."""
    if x.data_ptr() % 16:
        return False
    itemsize = x.element_size()
    shape, strides = x.shape, x.stride()
    return all(shape[i] == 1 or (strides[i] * itemsize) % 16 == 0 for i in range(3))


def _used_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, token) strides, with those of size-1 dims (never stepped along) set to safe values."""
    (batch, heads, tokens, head_dim), (sb, sh, sl, _) = x.shape, x.stride()
    return (sb if batch > 1 else 0, sh if heads > 1 else 0, sl if tokens > 1 else head_dim)


def _attention_fast_check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None) -> bool:
    """True for a valid call whose tensors TMA can read in place, in few attribute reads; False sends it through
    the full checks (and their messages) and the copy of misaligned views. Accepts nothing they refuse."""
    q_shape, k_shape, dtype = q.shape, k.shape, q.dtype
    if len(q_shape) != 4 or len(k_shape) != 4 or dtype not in DTYPES or k.dtype != dtype or v.dtype != dtype:
        return False
    batch, heads, q_len, head_dim = q_shape
    if k_shape != v.shape or k_shape[0] != batch or k_shape[1] != heads or k_shape[3] != head_dim:
        return False
    if head_dim not in HEAD_DIMS or batch * heads > 65535 or min(batch, heads, q_len, k_shape[2]) < 1:
        return False
    if softmax_scale is not None and not (math.isfinite(softmax_scale) and softmax_scale > 0):
        return False
    device = q.device
    if k.device != device or v.device != device:
        return False
    for x, shape in ((q, q_shape), (k, k_shape), (v, k_shape)):
        strides = x.stride()
        # 16-byte aligned base and token/head/batch strides (8 elements of 2 bytes) where the dim is stepped
        if strides[3] != 1 or x.data_ptr() % 16:
            return False
        if (shape[0] > 1 and strides[0] % 8) or (shape[1] > 1 and strides[1] % 8) or (shape[2] > 1 and strides[2] % 8):
            return False
    return True


def _check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(
                f"flash_attention: {name} has shape {tuple(x.shape)}; expected 4 dims [B, H, L, D] "
                "(view a [B, L, H, D] tensor as x.transpose(1, 2))"
            )
        if x.dtype not in DTYPES:
            raise ValueError(
                f"flash_attention: {name} has dtype {x.dtype}; allowed: torch.bfloat16, torch.float16; "
                f"cast with {name}.to(torch.bfloat16)"
            )
        if x.stride(-1) != 1:
            raise ValueError(
                f"flash_attention: {name} has stride {x.stride(-1)} in the head dim; it must be 1 "
                f"(call {name}.contiguous())"
            )
        if x.device != q.device:
            raise ValueError(f"flash_attention: {name} is on {x.device} but q is on {q.device}; use one device")
        if x.dtype != q.dtype:
            raise ValueError(f"flash_attention: {name} is {x.dtype} but q is {q.dtype}; use one dtype for q, k, v")
    batch, heads, q_len, head_dim = q.shape
    if head_dim not in HEAD_DIMS:
        raise ValueError(
            f"flash_attention: head_dim {head_dim} is not supported; allowed: {HEAD_DIMS} "
            "(use attention_ref or torch SDPA for other sizes)"
        )
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; they must match")
    if (k.shape[0], k.shape[1], k.shape[3]) != (batch, heads, head_dim):
        raise ValueError(
            f"flash_attention: q is [B, H, Lq, D] = {tuple(q.shape)} but k is {tuple(k.shape)}; "
            "B, H and D must match (no GQA/MQA)"
        )
    if batch * heads > 65535:
        raise ValueError(
            f"flash_attention: B * H = {batch * heads} is above the 65535 a grid dimension holds; split the batch"
        )
    if min(batch, heads, q_len, k.shape[2]) < 1:
        raise ValueError(
            f"flash_attention: empty input, q {tuple(q.shape)}, k {tuple(k.shape)}; B, H, Lq, Lk must be >= 1"
        )
    if softmax_scale is not None and not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"flash_attention: softmax_scale {softmax_scale} must be a finite number > 0 (or None)")


FORCED_CONFIG_ENV = "FLUX_KERNELS_ATTENTION_CONFIG"


@functools.cache
def forced_config(text: str) -> triton.Config:
    """'64,32,4,1' -> the config BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1."""
    try:
        block_m, block_n, warps, stages = (int(part) for part in text.split(","))
    except ValueError as err:
        raise ValueError(
            f"{FORCED_CONFIG_ENV}={text!r} is not 'BLOCK_M,BLOCK_N,warps,stages' (e.g. '128,64,4,2'); unset it to "
            "autotune"
        ) from err
    return _config(block_m, block_n, warps, stages)


def flash_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    *,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Checks, allocates and launches. q: [B, H, Lq, D], k, v: [B, H, Lk, D] -> [B, H, Lq, D] view of
    [B, Lq, H, D] memory. `config` (tests): launch that one config instead of the autotuned choice; the
    environment variable FLUX_KERNELS_ATTENTION_CONFIG="BLOCK_M,BLOCK_N,warps,stages" does the same for a whole
    process (ablations, and the regression gate's self-test with a deliberately poor tile)."""
    if config is None and FORCED_CONFIG_ENV in os.environ:
        config = forced_config(os.environ[FORCED_CONFIG_ENV])
    if not _attention_fast_check(q, k, v, softmax_scale):
        _check_attention_inputs(q, k, v, softmax_scale)
        # misaligned views (rare: an odd offset into a bigger buffer) are copied once rather than refused
        q, k, v = (x if _descriptor_ready(x) else x.clone(memory_format=torch.contiguous_format) for x in (q, k, v))
    if not q.is_cuda:
        check_runnable(q.device, "flash_attention")
    batch, heads, q_len, head_dim = q.shape
    key_len = k.shape[2]
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)

    out = new_output(batch, q_len, heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)

    def grid(meta):
        return (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads)

    args = (
        q, k, v, out, scale,
        *_used_strides(q), *_used_strides(k), *_used_strides(v), *_used_strides(out),
        heads, q_len, key_len,
    )  # fmt: skip

    with device_guard(q):
        if q.is_cuda:
            ensure_scratch_allocator()
        if config is not None:
            _flash_attention_fwd_kernel.fn[grid](*args, HEAD_DIM=head_dim, **config.all_kwargs())
        else:
            _launch_flash_attention((q_len, key_len, head_dim, q.dtype), grid, *args, HEAD_DIM=head_dim)
    return out


# ----------------------------------------------------------------------------- public op


@torch.library.custom_op("flux_kernels::flash_attention", mutates_args=())
def _flash_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None
) -> torch.Tensor:
    return flash_attention_fwd(q, k, v, softmax_scale)


@_flash_attention_op.register_fake
def _flash_attention_fake(q, k, v, softmax_scale=None):
    _check_attention_inputs(q, k, v, softmax_scale)
    batch, heads, q_len, head_dim = q.shape
    return q.new_empty(batch, q_len, heads, head_dim).transpose(1, 2)


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None
) -> torch.Tensor:
    """Flash-attention forward. q: [B, H, Lq, D], k, v: [B, H, Lk, D] (bf16/fp16, D 64/128, any strides with
    stride(-1) == 1) -> [B, H, Lq, D] whose memory is [B, Lq, H, D] contiguous. softmax_scale defaults to
    D ** -0.5.

    Under torch.compile this is the opaque custom op `flux_kernels::flash_attention` (with its fake, so
    fullgraph=True holds); eagerly it calls the launcher directly, skipping the op dispatch (~10-20 us a call).
    """
    if torch.compiler.is_compiling():
        return _flash_attention_op(q, k, v, softmax_scale)
    return flash_attention_fwd(q, k, v, softmax_scale)


__all__ = [
    "attention_ref",
    "ensure_scratch_allocator",
    "flash_attention",
    "flash_attention_fwd",
    "head_descriptor",
]
