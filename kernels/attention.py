"""Flash-attention forward (non-causal, no mask) for FLUX's joint text+image attention.

Fuses: S = QK^T * scale, online softmax (exp2, log2(e)-prescaled scale, fp32 running max/sum/accumulator),
O = PV, and the output transpose: O is written as [B, Lq, H, D] memory (returned as a [B, H, Lq, D] view),
so the caller's `out.transpose(1, 2).reshape(B, Lq, H * D)` is free.
Tuned for: B=1, H=24, D=128, bf16, L = 1536 / 4608 / 16896 (FLUX 512^2 / 1024^2 / 2048^2 with 512 text
tokens) on H100; Q, K, V tiles move through tensor descriptors (TMA on Hopper, plain loads before it), and
Hopper may pick an automatically warp-specialized config (see allow_warp_specialization).
Limits: forward only; head_dim 64 or 128; bf16/fp16; any B, H >= 1 and Lq, Lk >= 1 (tails are masked);
inputs of any strides with stride(-1) == 1 (16-byte aligned rows are used in place, others are copied once).
Measured: (pending GPU run).
"""

from __future__ import annotations

import math
import warnings

import torch
import triton
import triton.language as tl

from kernels import check_runnable, device_guard, new_output, triton_interpreting

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
def _attn_fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    desc_k,
    desc_v,
    lo,
    hi,
    Lk,
    qk_scale,
    BLOCK_N: tl.constexpr,
    MASK_TAIL: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    # Key blocks [lo, hi). Only the last, partial block needs MASK_TAIL: keys past Lk load as zeros (the
    # descriptor pads), and their scores must be -inf, not 0.
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = desc_k.load([start_n, 0])  # [BLOCK_N, D]
        qk = tl.dot(q, k.T)  # [BLOCK_M, BLOCK_N], fp32
        if MASK_TAIL:
            qk = tl.where((start_n + offs_n)[None, :] < Lk, qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk -= m_ij[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)
        l_ij = tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = desc_v.load([start_n, 0])  # [BLOCK_N, D]
        acc = tl.dot(p.to(v.dtype), v, acc)
        # updated last to keep fewer values live across the dots
        l_i = l_i * alpha + l_ij
        m_i = m_ij
    return acc, l_i, m_i


def _config(block_m: int, block_n: int, warps: int, stages: int, warp_specialize: bool = False) -> triton.Config:
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "WARP_SPECIALIZE": warp_specialize}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


# Hopper: 128-row Q tiles over two warpgroups (8 warps) or one (4 warps, BLOCK_N 64), 2-4 TMA stages
# (BLOCK_N 128 x D 128 x 3 stages of K and V + Q is ~224 KB, near the 227 KB limit: the autotuner drops
# what does not fit), plus the same shapes with Triton's automatic warp specialization.
_HOPPER_CONFIGS = [
    _config(128, 64, 4, 3),
    _config(128, 64, 4, 4),
    _config(128, 128, 8, 2),
    _config(128, 128, 8, 3),
    _config(128, 64, 4, 3, warp_specialize=True),
    _config(128, 128, 4, 2, warp_specialize=True),
    _config(128, 128, 4, 3, warp_specialize=True),
    _config(128, 128, 8, 2, warp_specialize=True),
]
# Ampere/Ada: small tiles that fit ~100 KB of shared memory (sm86/sm89) and 164 KB (sm80).
_OLDER_CONFIGS = [
    _config(128, 64, 4, 2),
    _config(64, 64, 4, 3),
    _config(64, 32, 4, 2),
]
# The interpreter runs each program in numpy: one small config, and a single config skips the autotuner's
# timing runs altogether (it benchmarks even a pruned list of one).
_INTERPRETER_CONFIGS = [_config(32, 32, 4, 1)]

_warp_specialize_allowed = True


def allow_warp_specialization(enabled: bool) -> None:
    """Let (or stop) the autotuner consider the warp-specialized Hopper configs; forgets tuned choices."""
    global _warp_specialize_allowed
    if _warp_specialize_allowed == bool(enabled):
        return
    _warp_specialize_allowed = bool(enabled)
    if not triton_interpreting():
        _flash_attention_fwd_kernel.cache.clear()


def _prune_attention_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    major, _ = torch.cuda.get_device_capability(args["Q"].device)
    # sm90/sm100 have ~227 KB of shared memory per block; sm8x and consumer sm12x much less
    family = _HOPPER_CONFIGS if major in (9, 10) else _OLDER_CONFIGS
    family_ids = {id(config) for config in family}
    candidates = [
        config
        for config in configs
        if id(config) in family_ids
        and config.kwargs["BLOCK_N"] <= args["HEAD_DIM"]
        and (not config.kwargs["WARP_SPECIALIZE"] or (major == 9 and _warp_specialize_allowed))
    ]
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
    WARP_SPECIALIZE: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)

    # One 2-D descriptor per (batch, head): arbitrary batch/head/token strides, and rows past Lq / Lk are
    # zero-filled on load and dropped on store by the descriptor itself.
    desc_q = tl.make_tensor_descriptor(
        Q + off_b * stride_qb + off_h * stride_qh,
        shape=[Lq, HEAD_DIM],
        strides=[stride_qm, 1],
        block_shape=[BLOCK_M, HEAD_DIM],
    )
    desc_k = tl.make_tensor_descriptor(
        K + off_b * stride_kb + off_h * stride_kh,
        shape=[Lk, HEAD_DIM],
        strides=[stride_kn, 1],
        block_shape=[BLOCK_N, HEAD_DIM],
    )
    desc_v = tl.make_tensor_descriptor(
        V + off_b * stride_vb + off_h * stride_vh,
        shape=[Lk, HEAD_DIM],
        strides=[stride_vn, 1],
        block_shape=[BLOCK_N, HEAD_DIM],
    )
    desc_o = tl.make_tensor_descriptor(
        Out + off_b * stride_ob + off_h * stride_oh,
        shape=[Lq, HEAD_DIM],
        strides=[stride_om, 1],
        block_shape=[BLOCK_M, HEAD_DIM],
    )

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = softmax_scale * 1.44269504  # exp(x) = exp2(x * log2(e))
    q = desc_q.load([start_m * BLOCK_M, 0])  # [BLOCK_M, D], stays on chip

    full_end = (Lk // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, desc_k, desc_v, 0, full_end, Lk, qk_scale, BLOCK_N, False, WARP_SPECIALIZE
    )
    # the partial last key block, if any: a loop of zero or one trip
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, desc_k, desc_v, full_end, Lk, Lk, qk_scale, BLOCK_N, True, False)

    acc = acc / l_i[:, None]
    desc_o.store([start_m * BLOCK_M, 0], acc.to(Out.dtype.element_ty))


# ----------------------------------------------------------------------------- launcher


def _torch_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    # Global scratch for the tensor descriptors the kernel builds on the device (128 bytes each).
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_scratch_allocator() -> None:
    """Device-side tensor descriptors need a Triton allocator; install one backed by PyTorch's, unless the
    process already set its own."""
    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # private API moved: set ours unconditionally
        pass
    triton.set_allocator(_torch_scratch)


def _descriptor_ready(x: torch.Tensor) -> bool:
    """Tensor descriptors (TMA) need a 16-byte aligned base and 16-byte multiple strides on used dims."""
    itemsize = x.element_size()
    strides_ok = all(
        size == 1 or (stride * itemsize) % 16 == 0 for size, stride in zip(x.shape[:-1], x.stride()[:-1], strict=True)
    )
    return x.data_ptr() % 16 == 0 and strides_ok


def _used_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, token) strides, with those of size-1 dims (never stepped along) set to safe values."""
    (batch, heads, tokens, head_dim), (sb, sh, sl, _) = x.shape, x.stride()
    return (sb if batch > 1 else 0, sh if heads > 1 else 0, sl if tokens > 1 else head_dim)


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


def flash_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None
) -> torch.Tensor:
    """Checks, allocates and launches. q: [B, H, Lq, D], k, v: [B, H, Lk, D] -> [B, H, Lq, D] view of
    [B, Lq, H, D] memory."""
    _check_attention_inputs(q, k, v, softmax_scale)
    check_runnable(q.device, "flash_attention")
    batch, heads, q_len, head_dim = q.shape
    key_len = k.shape[2]
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    # misaligned views (rare: an odd offset into a bigger buffer) are copied once rather than refused
    q, k, v = (x if _descriptor_ready(x) else x.clone(memory_format=torch.contiguous_format) for x in (q, k, v))

    out = new_output(batch, q_len, heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)

    def grid(meta):
        return (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads)

    def launch():
        _flash_attention_fwd_kernel[grid](
            q, k, v, out, scale,
            *_used_strides(q), *_used_strides(k), *_used_strides(v), *_used_strides(out),
            heads, q_len, key_len,
            HEAD_DIM=head_dim,
        )  # fmt: skip

    with device_guard(q):
        if q.device.type == "cuda":
            _ensure_scratch_allocator()
        try:
            launch()
        except Exception as error:  # noqa: BLE001 - any compiler failure of the optional warp-specialized path
            hopper = q.device.type == "cuda" and torch.cuda.get_device_capability(q.device)[0] == 9
            if not (hopper and _warp_specialize_allowed) or isinstance(error, torch.OutOfMemoryError):
                raise
            warnings.warn(
                f"flash_attention: tuning with warp-specialized configs failed ({type(error).__name__}: "
                f"{str(error)[:200]}); retrying without them",
                RuntimeWarning,
                stacklevel=2,
            )
            allow_warp_specialization(False)
            launch()
    return out


# ----------------------------------------------------------------------------- public op


@torch.library.custom_op("flux_kernels::flash_attention", mutates_args=())
def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None
) -> torch.Tensor:
    """Flash-attention forward. q: [B, H, Lq, D], k, v: [B, H, Lk, D] (bf16/fp16, D 64/128, any strides with
    stride(-1) == 1) -> [B, H, Lq, D] whose memory is [B, Lq, H, D] contiguous. softmax_scale defaults to
    D ** -0.5."""
    return flash_attention_fwd(q, k, v, softmax_scale)


@flash_attention.register_fake
def _flash_attention_fake(q, k, v, softmax_scale=None):
    _check_attention_inputs(q, k, v, softmax_scale)
    batch, heads, q_len, head_dim = q.shape
    return q.new_empty(batch, q_len, heads, head_dim).transpose(1, 2)


__all__ = ["allow_warp_specialization", "attention_ref", "flash_attention", "flash_attention_fwd"]
