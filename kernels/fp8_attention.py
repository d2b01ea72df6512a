"""Quantised flash attention (SageAttention2's recipe): S = Q K^T in int8, P V in float8 e4m3, fp32 softmax.

- Q and K: int8, one fp32 scale per (token, head) (amax / 127, round half away from zero). int8 rather than e4m3
  because it measured more accurate on FLUX-like activations (post-RMSNorm + RoPE, channel outliers), as
  SageAttention2 found: per-head output cosine against fp32 attention 0.9990-0.9997 where e4m3 gave 0.992-0.999
  (2026-11-30, benchmarks/NOTES.md). The QK-norm + RoPE kernel writes them directly
  (flux_kernels.qk_norm_rope.qk_norm_rope_int8); `quantize_qk` does it for other callers.
- V: e4m3, one fp32 scale per (head, channel) over all tokens (SageAttention2's choice), stored transposed
  ([B, H, D, L]): Hopper's fp8 MMA reads its B operand K-major, so P V needs V^T in memory (Triton's own fp8
  attention does the same). The scales are applied once, to the finished output.
- P: the softmax probabilities times 448 (folded into the exp2's offset: no extra instruction), cast to e4m3; the
  row sums take the same scaled values, so the 448 cancels. A block's P8 V8 is accumulated in a fresh fp32 tile and
  added to the running output (two-level accumulation: the MMA's own accumulator is narrower than fp32 for fp8,
  SageAttention2's observation).
- S's int32 -> fp32 conversion is an integer add and a float FMA (the 1.5 * 2^23 magic number: exact for
  |S| < 2^22, and |S| <= 128 * 127^2 ~ 2^21): the I2F instruction runs at the exp2 unit's rate (16 a cycle per SM)
  and cost as much as the exponential itself (first H200 run, 2026-11-30 01:37 UTC).
- softmax in exp2 with the running max in fp32, as flux_kernels.flash_attention; the output is bf16 in
  [B, Lq, H, D] memory returned as a [B, H, Lq, D] view (the transpose to the block's layout is free).
Tuned for: B=1, H=24, D=128 at L = 1536 / 4608 / 8704 / 16896 on an H200 (configs below; 64 x 128 tiles with 4
warps won at every length). Measured (H200, 2026-11-30, benchmarks/results/attention-h200-20261130-0144.json, CUDA
graph device time, inputs quantised beforehand): 406 / 589 / 635 / 663 TFLOP/s; cuDNN's bf16 SDPA 459 / 582 / 599 /
612. Sm 9.x only in the engine (other cards: untested).
Limits: forward only; head_dim 64 or 128; any B, H; Lq, Lk >= 1; outputs bf16 or fp16.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from flux_kernels import check_runnable, device_guard, new_output, triton_interpreting
from flux_kernels.flash_attention import ensure_scratch_allocator, head_descriptor
from flux_kernels.fp8 import (
    E4M3_MAX,
    FP8_DTYPE,
    MIN_SCALE,
    e4m3,
    int8_codes,
    quantize_int8_ref,
)
from flux_kernels.fp8_attention_inputs import LOG2E, check_quantized
from flux_kernels.tuning import TunedLaunch

CORE_ENV = "FLUX_KERNELS_FP8_ATTENTION_CORE"
# V^T's token stride is rounded up to this many elements: a tensor descriptor (TMA) needs 16-byte strides
TOKEN_ALIGN = 16

# ----------------------------------------------------------------------------- references (PyTorch)


def v_channel_scale(v: torch.Tensor) -> torch.Tensor:
    """v [B, H, L, D] -> fp32 [B, H, D]: each (head, channel)'s amax over the tokens / 448, floored at the smallest
    normal fp32 (a tensor divisor: PyTorch divides by a Python scalar as a product with its reciprocal)."""
    amax = v.abs().amax(2).float()
    return (amax / torch.full_like(amax, E4M3_MAX)).clamp(min=MIN_SCALE)


def quantize_v_ref(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v [B, H, L, D] -> (e4m3 V^T [B, H, D, L], fp32 scale [B, H, D]): one scale per (head, channel)."""
    scale = v_channel_scale(v)
    q = (v.float() * (1.0 / scale)[..., None, :]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return q.transpose(-1, -2), scale


def fp8_attention_ref(q8, q_scale, k8, k_scale, vt8, v_scale, softmax_scale=None, block_n: int = 64) -> torch.Tensor:
    """The kernel's arithmetic in PyTorch (fp32), key block by key block: the yardstick of the kernel tests.
    q8, k8: int8 [B, H, L, D]; vt8: e4m3 [B, H, D, >= Lk]; q/k scales fp32 [B, H, L], v's [B, H, D]
    -> fp32 [B, H, Lq, D]."""
    head_dim, key_len = q8.shape[-1], k8.shape[-2]
    scale = (head_dim**-0.5 if softmax_scale is None else softmax_scale) * LOG2E
    scores = (q8.float() @ k8.float().transpose(-1, -2)) * k_scale[..., None, :]  # int8 products are exact in fp32
    row_scale = q_scale[..., None] * scale
    v8 = vt8[..., :key_len].float().transpose(-1, -2)  # [B, H, Lk, D]
    shape = scores.shape[:-1]
    m_i = torch.full(shape, -math.inf, device=q8.device)
    l_i = torch.zeros(shape, device=q8.device)
    acc = torch.zeros(*shape, head_dim, device=q8.device)
    for start in range(0, key_len, block_n):
        s = scores[..., start : start + block_n]
        m_new = torch.maximum(m_i, s.amax(-1) * row_scale[..., 0])
        p = torch.exp2(s * row_scale - (m_new - math.log2(E4M3_MAX))[..., None])  # P * 448, <= 448
        alpha = torch.exp2(m_i - m_new)
        l_i = l_i * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + p.to(FP8_DTYPE).float() @ v8[..., start : start + block_n, :]
        m_i = m_new
    return acc / l_i[..., None] * v_scale[..., None, :]


# ----------------------------------------------------------------------------- quantisers (Triton)


@triton.jit
def _quantize_kernel(
    X,
    OUT,
    SCALE,
    stride_xb,
    stride_xh,
    stride_xl,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_od,
    stride_s,
    H,
    L,
    HEAD_DIM: tl.constexpr,
    BLOCK_L: tl.constexpr,
    V_E4M3: tl.constexpr,
):
    # One [BLOCK_L, D] tile of one head. V_E4M3: e4m3 codes with the given (head, channel) scales (V, written
    # transposed through the output strides); else int8 codes with per-token scales over D (Q, K).
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_l < L
    src = X + off_b * stride_xb + off_h * stride_xh + offs_l[:, None].to(tl.int64) * stride_xl + offs_d[None, :]
    x = tl.load(src, mask=rows[:, None], other=0.0).to(tl.float32)
    dst = OUT + off_b * stride_ob + off_h * stride_oh + offs_l[:, None].to(tl.int64) * stride_ol
    if V_E4M3:  # SCALE holds the (head, channel) scales [B * H, D], computed beforehand
        scale = tl.load(SCALE + off_bh.to(tl.int64) * stride_s + offs_d)
        codes = e4m3(x, tl.math.div_rn(1.0, scale)[None, :], OUT.dtype.element_ty)
        tl.store(dst + offs_d[None, :] * stride_od, codes, mask=rows[:, None])
    else:  # per-token scales, written to SCALE [B * H, L_alloc]
        codes, scale = int8_codes(x, tl.max(tl.abs(x), 1))
        tl.store(dst + offs_d[None, :] * stride_od, codes, mask=rows[:, None])
        tl.store(SCALE + off_bh.to(tl.int64) * stride_s + offs_l, scale, mask=rows)


def _padded(tokens: int) -> int:
    return -(-tokens // TOKEN_ALIGN) * TOKEN_ALIGN


def _quantize(x: torch.Tensor, v_e4m3: bool) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, tokens, head_dim = x.shape
    padded = _padded(tokens)
    if v_e4m3:  # V^T [B, H, D, L_pad]; the pad columns are never read (the descriptor's shape stops at L)
        scale = v_channel_scale(x)  # one PyTorch reduction over the tokens: ~1% of the attention's time
        out = torch.empty(batch, heads, head_dim, padded, dtype=FP8_DTYPE, device=x.device)
        out_strides = (out.stride(0), out.stride(1), 1, out.stride(2))
    else:
        scale = torch.empty(batch, heads, padded, dtype=torch.float32, device=x.device)
        out = torch.empty(batch, heads, tokens, head_dim, dtype=torch.int8, device=x.device)
        out_strides = (out.stride(0), out.stride(1), out.stride(2), 1)
    if not x.is_cuda:
        check_runnable(x.device, "fp8_attention")
    block = 16 if triton_interpreting() else 32  # 64 rows with 4 warps spilled registers (int8 path)
    with device_guard(x):
        _quantize_kernel[(triton.cdiv(tokens, block), batch * heads)](
            x, out, scale, x.stride(0), x.stride(1), x.stride(2), *out_strides, scale.shape[-1], heads, tokens,
            HEAD_DIM=head_dim, BLOCK_L=block, V_E4M3=v_e4m3, num_warps=4,
        )  # fmt: skip
    return out, (scale if v_e4m3 else scale[..., :tokens])


def quantize_qk(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q or k [B, H, L, D] (stride(-1) == 1) -> (int8 [B, H, L, D], fp32 scales [B, H, L])."""
    return _quantize(x, v_e4m3=False)


def quantize_v(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v [B, H, L, D] (stride(-1) == 1) -> (e4m3 V^T [B, H, D, L] (a view of a token-padded buffer), fp32 scales
    [B, H, D], one per head and channel)."""
    vt, scale = _quantize(v, v_e4m3=True)
    return vt[..., : v.shape[2]], scale


# ----------------------------------------------------------------------------- attention kernel


@triton.jit
def _key_block(acc, l_i, m_i, q, row_scale, desc_k, desc_v, k_scales, start_n, Lk, BLOCK_N: tl.constexpr,
               MASK_TAIL: tl.constexpr):  # fmt: skip
    # One key block's online-softmax update; m_i in log2 units, P scaled by 448 through the exp2's offset.
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASK_TAIL:
        ks = tl.load(k_scales + offs_n, mask=offs_n < Lk, other=0.0)
    else:
        ks = tl.load(k_scales + offs_n)
    k = desc_k.load([start_n, 0])  # [BLOCK_N, D] int8
    # S in fp32 without I2F: the int32 plus 1.5 * 2^23 read as fp32 is 1.5 * 2^23 + S exactly (|S| < 2^22), so
    # S * ks = bits * ks - 1.5 * 2^23 * ks: one integer add and one FMA per score
    s_int = tl.dot(q, k.T)
    s = (s_int + 0x4B400000).to(tl.float32, bitcast=True) * ks[None, :] - (12582912.0 * ks)[None, :]
    if MASK_TAIL:  # keys past Lk load as zeros (the descriptor pads); their scores must be -inf, not 0
        s = tl.where(offs_n[None, :] < Lk, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * row_scale)  # row_scale >= 0: max(S) * scale = max(S * scale)
    p = tl.math.exp2(s * row_scale[:, None] - (m_new - 8.807354922057604)[:, None])  # log2(448): P * 448 <= 448
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = desc_v.load([0, start_n])  # [D, BLOCK_N] e4m3 (V^T)
    acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), v.T)
    return acc, l_i, m_new


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Hopper candidates (sm90), each compiled ahead of time without register spills (ptxas -v, 2026-11-30): 128 x 128
# with 8 warps (two warpgroups, 255 registers) and 2-4 stages; 64 x 128 with 4 warps; 128 x 64 with 8 warps (195
# registers). 128 x 64 and 256 x 64 tiles with 4 / 8 warps spilled (~900 bytes), so they are not candidates.
_HOPPER_CONFIGS = [
    _config(128, 128, 8, 3),
    _config(128, 128, 8, 2),
    _config(128, 128, 8, 4),
    _config(64, 128, 4, 3),
    _config(128, 64, 8, 3),
]
_INTERPRETER_CONFIGS = [_config(32, 32, 4, 1)]


def _prune_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] <= max(args["Lq"], 64)]
    return fitting or configs[:1]


@triton.autotune(
    configs=_INTERPRETER_CONFIGS if triton_interpreting() else _HOPPER_CONFIGS,
    key=["Lq", "Lk", "HEAD_DIM"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _fp8_attention_fwd_kernel(
    Q,
    QS,
    K,
    KS,
    VT,
    VS,
    Out,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vd,
    stride_qsb,
    stride_qsh,
    stride_ksb,
    stride_ksh,
    stride_vsb,
    stride_vsh,
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
    desc_q = head_descriptor(Q + off_b * stride_qb + off_h * stride_qh, Lq, HEAD_DIM, stride_qm, BLOCK_M, HEAD_DIM)
    desc_k = head_descriptor(K + off_b * stride_kb + off_h * stride_kh, Lk, HEAD_DIM, stride_kn, BLOCK_N, HEAD_DIM)
    desc_v = head_descriptor(VT + off_b * stride_vb + off_h * stride_vh, HEAD_DIM, Lk, stride_vd, HEAD_DIM, BLOCK_N)
    desc_o = head_descriptor(Out + off_b * stride_ob + off_h * stride_oh, Lq, HEAD_DIM, stride_om, BLOCK_M, HEAD_DIM)
    k_scales = KS + off_b * stride_ksb + off_h * stride_ksh
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_scale = tl.load(QS + off_b * stride_qsb + off_h * stride_qsh + offs_m, mask=offs_m < Lq, other=1.0)
    row_scale = q_scale * qk_scale  # softmax scale * log2(e) * Q's scale: scores in log2 units

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    q = desc_q.load([start_m * BLOCK_M, 0])  # [BLOCK_M, D] int8, stays on chip

    full_end = (Lk // BLOCK_N) * BLOCK_N
    for start_n in tl.range(0, full_end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, l_i, m_i = _key_block(acc, l_i, m_i, q, row_scale, desc_k, desc_v, k_scales, start_n, Lk, BLOCK_N, False)
    if full_end < Lk:  # the partial last key block: the only masked one
        acc, l_i, m_i = _key_block(acc, l_i, m_i, q, row_scale, desc_k, desc_v, k_scales, full_end, Lk, BLOCK_N, True)
    v_scale = tl.load(VS + off_b * stride_vsb + off_h * stride_vsh + tl.arange(0, HEAD_DIM))
    acc = acc / l_i[:, None] * v_scale[None, :]
    desc_o.store([start_m * BLOCK_M, 0], acc.to(Out.dtype.element_ty))


_launch_fp8_attention = TunedLaunch(_fp8_attention_fwd_kernel, tokens=(0, 1))


# ----------------------------------------------------------------------------- launcher


def gluon_core_options(text: str) -> dict:
    """FLUX_KERNELS_FP8_ATTENTION_CORE's value -> fp8_attention_gluon_fwd's options: 'gluon' (its defaults) or
    'gluon,STAGES' (its pipeline stages, 2-4)."""
    parts = text.split(",")
    if parts[0] == "gluon" and len(parts) == 1:
        return {}
    if parts[0] == "gluon" and len(parts) == 2 and parts[1] in ("2", "3", "4"):
        return {"stages": int(parts[1])}
    raise ValueError(
        f"{CORE_ENV}={text!r}: allowed 'triton' (the default), 'gluon' or 'gluon,STAGES' with STAGES 2-4 "
        "(e.g. 'gluon,2')"
    )


def fp8_attention_quantized_fwd(q8, q_scale, k8, k_scale, vt8, v_scale, softmax_scale=None,
                                out_dtype=torch.bfloat16, *, config: triton.Config | None = None):  # fmt: skip
    """Checks, allocates and launches; see fp8_attention_quantized. FLUX_KERNELS_FP8_ATTENTION_CORE=gluon[,...] sends
    the calls without a `config` to flux_kernels.fp8_attention_gluon (Hopper) instead, for a whole process (A/B runs;
    see gluon_core_options)."""
    check_quantized(q8, q_scale, k8, k_scale, vt8, v_scale, out_dtype)
    if not q8.is_cuda:
        check_runnable(q8.device, "fp8_attention")
    batch, heads, q_len, head_dim = q8.shape
    key_len = k8.shape[2]
    if softmax_scale is not None and not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"fp8_attention: softmax_scale {softmax_scale} must be a finite number > 0 (or None)")
    if config is None and os.environ.get(CORE_ENV, "triton") != "triton":
        from flux_kernels.fp8_attention_gluon import fp8_attention_gluon_fwd

        return fp8_attention_gluon_fwd(q8, q_scale, k8, k_scale, vt8, v_scale, softmax_scale, out_dtype,
                                       **gluon_core_options(os.environ[CORE_ENV]))  # fmt: skip
    qk_scale = (head_dim**-0.5 if softmax_scale is None else float(softmax_scale)) * LOG2E
    out = new_output(batch, q_len, heads, head_dim, dtype=out_dtype, device=q8.device).transpose(1, 2)

    def grid(meta):
        return (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads)

    args = (
        q8, q_scale, k8, k_scale, vt8, v_scale, out, qk_scale,
        *q8.stride()[:3], *k8.stride()[:3], *vt8.stride()[:3],
        *q_scale.stride()[:2], *k_scale.stride()[:2], *v_scale.stride()[:2],
        out.stride(0), out.stride(1), out.stride(2), heads, q_len, key_len,
    )  # fmt: skip
    with device_guard(q8):
        if q8.is_cuda:
            ensure_scratch_allocator()
        if config is not None:
            _fp8_attention_fwd_kernel.fn[grid](*args, HEAD_DIM=head_dim, **config.all_kwargs())
        else:
            _launch_fp8_attention((q_len, key_len, head_dim), grid, *args, HEAD_DIM=head_dim)
    return out


@torch.library.custom_op("flux_kernels::fp8_attention_quantized", mutates_args=())
def _fp8_attention_quantized_op(
    q8: torch.Tensor,
    q_scale: torch.Tensor,
    k8: torch.Tensor,
    k_scale: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    vt8, v_scale = quantize_v(v)
    return fp8_attention_quantized_fwd(q8, q_scale, k8, k_scale, vt8, v_scale, softmax_scale, v.dtype)


@_fp8_attention_quantized_op.register_fake
def _fp8_attention_quantized_fake(q8, q_scale, k8, k_scale, v, softmax_scale=None):
    batch, heads, q_len, head_dim = q8.shape
    return v.new_empty(batch, q_len, heads, head_dim).transpose(1, 2)


def fp8_attention_qk8(q8, q_scale, k8, k_scale, v, softmax_scale=None) -> torch.Tensor:
    """Attention over int8 Q, K (with their [B, H, L] fp32 scales, e.g. from qk_norm_rope(int8_qk=True)) and a
    bf16/fp16 V [B, H, Lk, D], which is quantised here (e4m3, transposed). -> [B, H, Lq, D] in V's dtype, a view of
    [B, Lq, H, D] memory. The custom op `flux_kernels::fp8_attention_quantized` under torch.compile."""
    if v.dim() != 4 or v.stride(-1) != 1 or v.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"fp8_attention: v has shape {tuple(v.shape)}, dtype {v.dtype}, strides {v.stride()}; expected a bf16 "
            "or fp16 [B, H, Lk, D] tensor with stride(-1) == 1"
        )
    if torch.compiler.is_compiling():
        return _fp8_attention_quantized_op(q8, q_scale, k8, k_scale, v, softmax_scale)
    vt8, v_scale = quantize_v(v)
    return fp8_attention_quantized_fwd(q8, q_scale, k8, k_scale, vt8, v_scale, softmax_scale, v.dtype)


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None):
    """softmax(Q K^T * scale) V with Q, K quantised to int8 and P, V to e4m3 here. q: [B, H, Lq, D], k, v:
    [B, H, Lk, D] (bf16/fp16, D 64/128, stride(-1) == 1) -> [B, H, Lq, D] view of [B, Lq, H, D] memory. Lossy:
    per-head cosine >= 0.999 against fp32 attention on FLUX-like activations (see the module docstring)."""
    for name, x in (("q", q), ("k", k)):
        if x.dim() != 4 or x.stride(-1) != 1 or x.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"fp8_attention: {name} has shape {tuple(x.shape)}, dtype {x.dtype}, strides {x.stride()}; expected "
                "a bf16 or fp16 [B, H, L, D] tensor with stride(-1) == 1"
            )
    q8, q_scale = quantize_qk(q)
    k8, k_scale = quantize_qk(k)
    return fp8_attention_qk8(q8, q_scale, k8, k_scale, v, softmax_scale)


def quantized_attention(query, key, value, softmax_scale: float | None = None) -> torch.Tensor:
    """fp8_attention_qk8 for (int8 codes, scales) pairs of q and k (qk_norm_rope_int8_pairs), fp8_attention for bf16
    ones: the engine's 'triton-fp8' core, whichever QK-norm ran before it."""
    if isinstance(query, tuple):
        return fp8_attention_qk8(*query, *key, value, softmax_scale)
    return fp8_attention(query, key, value, softmax_scale)


__all__ = [
    "fp8_attention",
    "fp8_attention_qk8",
    "fp8_attention_quantized_fwd",
    "fp8_attention_ref",
    "quantize_int8_ref",
    "quantize_qk",
    "quantize_v",
    "quantize_v_ref",
    "quantized_attention",
    "v_channel_scale",
]
