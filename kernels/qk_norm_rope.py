"""qk_norm_rope: the fused-QKV split, the per-head RMSNorm of q and k (fp32 variance, weight [D]), the rotary
embedding of q and k (diffusers' apply_rotary_emb, use_real, interleaved pairs), the text+image concatenation of the
double-stream blocks, and the [B, L, H, D] -> [B, H, L, D] transpose that the attention kernel wants, in one pass
over memory; v is only copied. Keeps fp32 through norm and rotary and rounds once. One program per token: its H
heads of q, k, v are H * D contiguous elements, read as one [T, H, D] tile (16-byte vectors); the rotary partner
comes from tl.split/tl.join of the same registers, not a second load.
Tuned for: H = 24 heads of D = 128, bf16, on H100 (L_txt = 512, L_img = 1024 / 4096 / 16384). Eager calls launch
directly (the custom op `flux_kernels::qk_norm_rope` only under torch.compile).
qk_norm_rope_grouped writes q, k and v instead in one tensor laid out for a Ulysses all-to-all ([slices, groups, L,
3, B, H'', D]: each group's heads of each slice one contiguous block), so that context parallelism sends them as
they are instead of copying them into that layout (engine/parallel/exchange.py).
Limits: the last dim of every input must be contiguous (stride 1); head_dim a power of two in [16, 256]; bf16,
fp16 or fp32 activations.
Measured (H100 80GB HBM3, 2026-11-26, benchmarks/results/norm-h100-80gb-hbm3-20261126-1800.json; GB/s from
CUDA-graph device time, % of the 3001 GB/s copy ceiling): 2615 / 2831 / 2911 (87 / 94 / 97%) at L_img = 1024 /
4096 / 16384, torch.compile of the reference 871 / 1292 / 1360.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flux_kernels import check_runnable, device_guard, new_output
from flux_kernels.fp8 import FP8_MIN_SCALE, TL_E4M3_MAX, e4m3, int8_codes, quantize_int8_ref
from flux_kernels.rowwise import (
    ACTIVATION_DTYPES,
    batch_token_strides,
    check_activation,
    check_floating,
    check_last_dim_contiguous,
    configs,
)
from flux_kernels.tuning import TunedLaunch


def _rms_norm_like_diffusers(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """diffusers RMSNorm.forward (non-NPU path), step for step: fp32 variance, cast to the weight's half
    dtype before multiplying by it."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        x = x.to(weight.dtype)
    return x * weight


def _rotary_like_diffusers(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=1).
    x: [B, L, H, D], cos/sin: [L, D]."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)  # [B, L, H, D/2]
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def qk_norm_rope_ref(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    eps: float = 1e-6,
    txt_qkv: torch.Tensor | None = None,
    txt_q_weight: torch.Tensor | None = None,
    txt_k_weight: torch.Tensor | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """diffusers' FluxAttnProcessor from the fused QKV projection to the inputs of attention:
    norm_q/norm_k (+ norm_added_q/k on the text stream), cat([text, image]), apply_rotary_emb.

    qkv: [B, L_img, 3*H*D] (q|k|v, each head-major), txt_qkv: [B, L_txt, 3*H*D] or None,
    cos/sin: [L_txt + L_img, D] -> q, k, v: [B, H, L_txt + L_img, D] contiguous.
    upcast=True runs every step in fp32 (fp32 outputs); upcast=False is diffusers' exact sequence.
    """
    tensors = [qkv, q_weight, k_weight, cos, sin, txt_qkv, txt_q_weight, txt_k_weight]
    if upcast:
        tensors = [t.float() if t is not None else None for t in tensors]
    qkv, q_weight, k_weight, cos, sin, txt_qkv, txt_q_weight, txt_k_weight = tensors

    def split_norm(stream: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor):
        query, key, value = stream.unflatten(-1, (3, heads, -1)).unbind(2)  # each [B, L, H, D]
        return _rms_norm_like_diffusers(query, wq, eps), _rms_norm_like_diffusers(key, wk, eps), value

    query, key, value = split_norm(qkv, q_weight, k_weight)
    if txt_qkv is not None:
        txt_query, txt_key, txt_value = split_norm(txt_qkv, txt_q_weight, txt_k_weight)
        query = torch.cat([txt_query, query], dim=1)
        key = torch.cat([txt_key, key], dim=1)
        value = torch.cat([txt_value, value], dim=1)
    query = _rotary_like_diffusers(query, cos, sin)
    key = _rotary_like_diffusers(key, cos, sin)
    return tuple(x.transpose(1, 2).contiguous() for x in (query, key, value))


@triton.jit
def _norm_rotate(
    x,
    rstd,
    weight,
    cos_even,
    cos_odd,
    sin_even,
    sin_odd,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    # x: [T, H, D] fp32, rstd: [T, H, 1], weight: [T, 1, D]; cos/sin halves: [T, 1, D/2] -> fp32 [T, H, D].
    # Interleaved pairs (2i, 2i+1) sit in one thread, so split/join move no data: one load per element.
    normed = x * rstd * weight
    even, odd = tl.split(tl.reshape(normed, [BLOCK_T, BLOCK_H, HEAD_DIM // 2, 2]))
    rotated = tl.join(even * cos_even - odd * sin_even, odd * cos_odd + even * sin_odd)
    return tl.reshape(rotated, [BLOCK_T, BLOCK_H, HEAD_DIM])


@triton.jit
def _pair_halves(table, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr):
    # [T, 1, D] -> even and odd columns, each [T, 1, D/2]
    return tl.split(tl.reshape(table, [BLOCK_T, 1, HEAD_DIM // 2, 2]))


_QK_NORM_ROPE_CONFIGS = configs(
    [
        triton.Config({"BLOCK_T": tokens}, num_warps=warps, num_stages=1)
        # (1, 8) won at every FLUX shape with one padded block of heads; 16 warps lost. (4, 8): three blocks of 8
        # heads (the e4m3 path) issue ~15% fewer instructions a token than (1, 4), the next best (SASS for sm_90)
        for tokens, warps in ((1, 4), (1, 8), (2, 8), (4, 8))
    ],
    interpreter=triton.Config({"BLOCK_T": 16}, num_warps=4, num_stages=1),
)


def _prune_qk_norm_rope_configs(configs, named_args, **kwargs):
    # at most 32 fp32 values of one [T, H, D] tile per thread: more spills to local memory
    args = {**named_args, **kwargs}
    tile = args["BLOCK_H"] * args["HEAD_DIM"]
    kept = [c for c in configs if c.kwargs["BLOCK_T"] * tile <= 32 * 32 * c.num_warps]
    return kept or configs[:1]


@triton.autotune(
    configs=_QK_NORM_ROPE_CONFIGS,
    key=["L_txt", "L_img", "H", "HEAD_DIM"],
    prune_configs_by={"early_config_prune": _prune_qk_norm_rope_configs},
)
@triton.jit
def _qk_norm_rope_fwd_kernel(
    IMG,
    TXT,
    Q_W,
    K_W,
    TXT_Q_W,
    TXT_K_W,
    COS,
    SIN,
    Q_OUT,
    K_OUT,
    V_OUT,
    QS_OUT,
    KS_OUT,
    stride_img_b,
    stride_img_l,
    stride_txt_b,
    stride_txt_l,
    stride_cos_l,
    stride_sin_l,
    stride_out_b,
    stride_out_l,
    stride_out_group,
    stride_out_slice,
    heads_per_group,
    heads_per_slice,
    L_txt,
    L_img,
    H,
    eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_TXT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    INT8_QK: tl.constexpr = False,
    GROUPED_OUT: tl.constexpr = False,
    E4M3_QK: tl.constexpr = False,
    E4M3_BOUND: tl.constexpr = 1.0,
    H_CHUNKS: tl.constexpr = 1,
):
    # BLOCK_T whole tokens per program: all H heads of q, k and v of a token are H * D contiguous elements of
    # its fused row, read as one [T, H, D] tile (16-byte vectors along D). Positions are in the joint
    # [text, image] sequence; a block may straddle the two segments.
    batch = tl.program_id(1).to(tl.int64)
    L_total = L_txt + L_img
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < L_total
    tokens = tl.where(token_ok, tokens, 0).to(tl.int64)  # masked tokens keep in-bounds addresses
    offs_d = tl.arange(0, HEAD_DIM)

    row = IMG + batch * stride_img_b + (tokens - L_txt) * stride_img_l  # [T] row starts
    weight_q = tl.load(Q_W + offs_d).to(tl.float32)
    weight_k = tl.load(K_W + offs_d).to(tl.float32)
    q_wmax, k_wmax = tl.max(tl.abs(weight_q), 0), tl.max(tl.abs(weight_k), 0)  # for E4M3_QK's static scales
    weight_q, weight_k = weight_q[None, None, :], weight_k[None, None, :]
    if HAS_TXT:
        is_txt = tokens < L_txt
        row = tl.where(is_txt, TXT + batch * stride_txt_b + tokens * stride_txt_l, row)
        is_txt = is_txt[:, None, None]
        txt_q, txt_k = tl.load(TXT_Q_W + offs_d).to(tl.float32), tl.load(TXT_K_W + offs_d).to(tl.float32)
        q_wmax, k_wmax = tl.maximum(q_wmax, tl.max(tl.abs(txt_q), 0)), tl.maximum(k_wmax, tl.max(tl.abs(txt_k), 0))
        weight_q = tl.where(is_txt, txt_q[None, None, :], weight_q)
        weight_k = tl.where(is_txt, txt_k[None, None, :], weight_k)
    section = H * HEAD_DIM  # q | k | v sections of a fused row

    table_mask = token_ok[:, None, None]
    cos = tl.load(COS + tokens[:, None, None] * stride_cos_l + offs_d[None, None, :], mask=table_mask, other=0.0)
    sin = tl.load(SIN + tokens[:, None, None] * stride_sin_l + offs_d[None, None, :], mask=table_mask, other=0.0)
    cos_even, cos_odd = _pair_halves(cos.to(tl.float32), BLOCK_T, HEAD_DIM)
    sin_even, sin_odd = _pair_halves(sin.to(tl.float32), BLOCK_T, HEAD_DIM)

    # H_CHUNKS > 1: the heads in H_CHUNKS blocks of BLOCK_H (FLUX's 24 as three of 8), none masked; one block of the
    # next power of two (32 for 24) spends a quarter of the issue slots on masked lanes
    for chunk in tl.static_range(H_CHUNKS):
        heads = chunk * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = token_ok[:, None, None] & (heads < H)[None, :, None]  # [T, H, 1]
        src = row[:, None, None] + (heads * HEAD_DIM)[None, :, None] + offs_d[None, None, :]  # [T, H, D] of q
        if GROUPED_OUT:  # head h at group h // heads_per_group, its slice, and head h % heads_per_slice of the slice
            within = heads.to(tl.int64) % heads_per_group
            head_offset = (
                (heads.to(tl.int64) // heads_per_group) * stride_out_group
                + (within // heads_per_slice) * stride_out_slice
                + (within % heads_per_slice) * HEAD_DIM
            )  # [H]
            dst = (
                batch * stride_out_b
                + tokens[:, None, None] * stride_out_l
                + head_offset[None, :, None]
                + offs_d[None, None, :]
            )
        else:  # outputs [B, H, L_total, D]: each head of a token is one contiguous D-row
            dst = (batch * H + heads)[None, :, None] * L_total + tokens[:, None, None]
            dst = dst * HEAD_DIM + offs_d[None, None, :]

        x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=2) / HEAD_DIM + eps)[:, :, None]
        q = _norm_rotate(x, rstd, weight_q, cos_even, cos_odd, sin_even, sin_odd, BLOCK_T, BLOCK_H, HEAD_DIM)
        if INT8_QK:  # int8 codes and one fp32 scale per (token, head), [B, H, L_total], for the quantised attention
            scale_dst = (batch * H + heads)[None, :] * L_total + tokens[:, None]  # [T, H]
            scale_mask = token_ok[:, None] & (heads < H)[None, :]
            codes, scale = int8_codes(q, tl.max(tl.abs(q), 2))
            tl.store(Q_OUT + dst, codes, mask=mask)
            tl.store(QS_OUT + scale_dst, scale, mask=scale_mask)
        elif E4M3_QK:  # e4m3 with one static scale per tensor from the weights (flux_kernels.cudnn_attention.qk_bound)
            descale = tl.maximum(tl.math.div_rn(q_wmax * E4M3_BOUND, TL_E4M3_MAX), FP8_MIN_SCALE)
            tl.store(Q_OUT + dst, e4m3(q, tl.math.div_rn(1.0, descale), Q_OUT.dtype.element_ty), mask=mask)
            tl.store(QS_OUT, descale, mask=(tl.program_id(0) == 0) & (batch == 0))
        else:
            tl.store(Q_OUT + dst, q.to(Q_OUT.dtype.element_ty), mask=mask)

        x = tl.load(src + section, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=2) / HEAD_DIM + eps)[:, :, None]
        k = _norm_rotate(x, rstd, weight_k, cos_even, cos_odd, sin_even, sin_odd, BLOCK_T, BLOCK_H, HEAD_DIM)
        if INT8_QK:
            codes, scale = int8_codes(k, tl.max(tl.abs(k), 2))
            tl.store(K_OUT + dst, codes, mask=mask)
            tl.store(KS_OUT + scale_dst, scale, mask=scale_mask)
        elif E4M3_QK:
            descale = tl.maximum(tl.math.div_rn(k_wmax * E4M3_BOUND, TL_E4M3_MAX), FP8_MIN_SCALE)
            tl.store(K_OUT + dst, e4m3(k, tl.math.div_rn(1.0, descale), K_OUT.dtype.element_ty), mask=mask)
            tl.store(KS_OUT, descale, mask=(tl.program_id(0) == 0) & (batch == 0))
        else:
            tl.store(K_OUT + dst, k.to(K_OUT.dtype.element_ty), mask=mask)

        v = tl.load(src + 2 * section, mask=mask)
        tl.store(V_OUT + dst, v, mask=mask)


_launch_qk_norm_rope = TunedLaunch(_qk_norm_rope_fwd_kernel, tokens=(0, 1))


def _check_qk_norm_rope_inputs(qkv, q_weight, k_weight, cos, sin, heads, txt_qkv, txt_q_weight, txt_k_weight):
    op = "qk_norm_rope"
    check_activation(op, "qkv", qkv, 3, "[B, L_img, 3*H*D]")
    if heads < 1 or qkv.shape[-1] % (3 * heads) != 0:
        raise ValueError(
            f"{op}: qkv's last dim {qkv.shape[-1]} is not 3 * heads * head_dim for heads={heads}; pass the number "
            "of attention heads (24 for FLUX)"
        )
    head_dim = qkv.shape[-1] // (3 * heads)
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"{op}: head_dim {head_dim} is not a power of two in [16, 256]; use qk_norm_rope_ref")
    batch, image_tokens = qkv.shape[0], qkv.shape[1]
    text_tokens = 0
    if txt_qkv is not None:
        if txt_q_weight is None or txt_k_weight is None:
            raise ValueError(f"{op}: txt_qkv needs txt_q_weight and txt_k_weight (norm_added_q/k weights)")
        check_activation(op, "txt_qkv", txt_qkv, 3, "[B, L_txt, 3*H*D]")
        if txt_qkv.shape[0] != batch or txt_qkv.shape[2] != qkv.shape[2]:
            raise ValueError(
                f"{op}: txt_qkv is {tuple(txt_qkv.shape)} but qkv is {tuple(qkv.shape)}; batch and last dim must match"
            )
        if txt_qkv.dtype != qkv.dtype or txt_qkv.device != qkv.device:
            raise ValueError(f"{op}: txt_qkv is {txt_qkv.dtype} on {txt_qkv.device}, qkv {qkv.dtype} on {qkv.device}")
        text_tokens = txt_qkv.shape[1]
    elif txt_q_weight is not None or txt_k_weight is not None:
        raise ValueError(f"{op}: txt_q_weight/txt_k_weight were given without txt_qkv; pass txt_qkv or neither")
    if min(batch, image_tokens) < 1:
        raise ValueError(f"{op}: qkv {tuple(qkv.shape)} is empty; need B >= 1 and L_img >= 1")
    weights = [("q_weight", q_weight), ("k_weight", k_weight)]
    if txt_qkv is not None:
        weights += [("txt_q_weight", txt_q_weight), ("txt_k_weight", txt_k_weight)]
    for name, weight in weights:
        check_floating(op, name, weight, qkv.device)
        if weight.shape != (head_dim,) or weight.stride(0) != 1:
            raise ValueError(
                f"{op}: {name} has shape {tuple(weight.shape)}, stride {weight.stride()}; expected a contiguous "
                f"[{head_dim}] (head_dim)"
            )
    if len({weight.dtype for _, weight in weights}) > 1:
        raise ValueError(
            f"{op}: the norm weights have dtypes {[str(w.dtype) for _, w in weights]}; give them one dtype"
        )
    total = text_tokens + image_tokens
    for name, table in (("cos", cos), ("sin", sin)):
        check_floating(op, name, table, qkv.device)
        if table.shape != (total, head_dim):
            raise ValueError(
                f"{op}: {name} has shape {tuple(table.shape)}; expected [L_txt + L_img, head_dim] = "
                f"[{total}, {head_dim}] as FluxPosEmbed returns for the text and image ids"
            )
        check_last_dim_contiguous(op, name, table)
    return head_dim, text_tokens, image_tokens


_QK_HEAD_DIMS = frozenset(2**i for i in range(4, 9))  # powers of two in [16, 256]


def _qk_norm_rope_fast_check(qkv, q_weight, k_weight, cos, sin, heads, txt_qkv, txt_q_weight, txt_k_weight):
    """(head_dim, L_txt, L_img) for a valid call in few attribute reads, else None: the caller then runs the
    full checks, which raise with the message. Accepts nothing that _check_qk_norm_rope_inputs refuses."""
    shape = qkv.shape
    if len(shape) != 3 or qkv.dtype not in ACTIVATION_DTYPES or qkv.stride()[2] != 1 or heads < 1:
        return None
    batch, image_tokens, width = shape
    head_dim, rest = divmod(width, 3 * heads)
    if rest or head_dim not in _QK_HEAD_DIMS or batch < 1 or image_tokens < 1:
        return None
    device = qkv.device
    text_tokens = 0
    weights = (q_weight, k_weight)
    if txt_qkv is not None:
        txt_shape = txt_qkv.shape
        if (
            txt_q_weight is None
            or txt_k_weight is None
            or len(txt_shape) != 3
            or txt_shape[0] != batch
            or txt_shape[2] != width
            or txt_qkv.dtype != qkv.dtype
            or txt_qkv.stride()[2] != 1
            or txt_qkv.device != device
        ):
            return None
        text_tokens = txt_shape[1]
        weights = (q_weight, k_weight, txt_q_weight, txt_k_weight)
    elif txt_q_weight is not None or txt_k_weight is not None:
        return None
    weight_dtype = q_weight.dtype
    if not q_weight.is_floating_point():
        return None
    for weight in weights:
        if weight.shape != (head_dim,) or weight.stride()[0] != 1 or weight.dtype != weight_dtype:
            return None
        if weight.device != device:
            return None
    table_shape = (text_tokens + image_tokens, head_dim)
    for table in (cos, sin):
        if table.shape != table_shape or table.stride()[1] != 1 or not table.is_floating_point():
            return None
        if table.device != device:
            return None
    return head_dim, text_tokens, image_tokens


def qk_norm_rope_fwd(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    eps: float = 1e-6,
    txt_qkv: torch.Tensor | None = None,
    txt_q_weight: torch.Tensor | None = None,
    txt_k_weight: torch.Tensor | None = None,
    int8_qk: bool = False,
    grouped: tuple[int, int] | None = None,
    e4m3_bound: float | None = None,
) -> tuple[torch.Tensor, ...]:
    """Checks, allocates and launches; see qk_norm_rope (and qk_norm_rope_int8 for int8_qk=True, and
    qk_norm_rope_grouped for grouped=(groups, slices), which returns (packed,)). e4m3_bound=F: q and k leave as
    e4m3 codes with the static descale max|weight| * F / 448 each (cudnn_attention.qk_norm_rope_e4m3_pairs):
    -> (q8, q_descale, k8, k_descale, v), the descales fp32 [1, 1, 1, 1]."""
    e4m3_qk = e4m3_bound is not None
    if e4m3_qk and (int8_qk or grouped is not None):
        raise ValueError("qk_norm_rope: e4m3 q and k have neither int8 codes nor a grouped layout")
    args = (qkv, q_weight, k_weight, cos, sin, heads, txt_qkv, txt_q_weight, txt_k_weight)
    head_dim, text_tokens, image_tokens = _qk_norm_rope_fast_check(*args) or _check_qk_norm_rope_inputs(*args)
    if not qkv.is_cuda:
        check_runnable(qkv.device, "qk_norm_rope")
    batch, total = qkv.shape[0], text_tokens + image_tokens
    if grouped is not None:
        groups, slices = grouped
        _check_grouping(heads, groups, slices, int8_qk)
        per_slice = heads // (groups * slices)
        packed = new_output(slices, groups, total, 3, batch, per_slice, head_dim, dtype=qkv.dtype, device=qkv.device)
        q, k, v = packed.unbind(3)  # [C, G, L, B, H'', D] views, one q | k | v section apart
        # (b, l, group, slice) strides; heads of a slice are contiguous D-rows
        out_strides = (q.stride(3), q.stride(2), q.stride(1), q.stride(0), heads // groups, heads // (groups * slices))
    else:
        qk_dtype = torch.int8 if int8_qk else torch.float8_e4m3fn if e4m3_qk else qkv.dtype
        q, k = (new_output(batch, heads, total, head_dim, dtype=qk_dtype, device=qkv.device) for _ in range(2))
        v = new_output(batch, heads, total, head_dim, dtype=qkv.dtype, device=qkv.device)
        out_strides = (0, 0, 0, 0, heads, heads)  # unused: [B, H, L, D] addressing
    if int8_qk:
        q_scale, k_scale = (new_output(batch, heads, total, dtype=torch.float32, device=qkv.device) for _ in range(2))
    elif e4m3_qk:
        q_scale, k_scale = (new_output(1, 1, 1, 1, dtype=torch.float32, device=qkv.device) for _ in range(2))
    else:
        q_scale = k_scale = q  # never written
    has_txt = txt_qkv is not None
    txt = txt_qkv if has_txt else qkv  # never read when has_txt is False
    txt_q_weight, txt_k_weight = (txt_q_weight, txt_k_weight) if has_txt else (q_weight, k_weight)

    def grid(meta):
        return (triton.cdiv(total, meta["BLOCK_T"]), batch)

    key = (text_tokens, image_tokens, heads, head_dim, qkv.dtype, q_weight.dtype, cos.dtype, sin.dtype, int8_qk)
    block_h, h_chunks = triton.next_power_of_2(heads), 1
    if e4m3_qk:  # its own choice (other stores); the other keys, and tables, stay as they were
        key += ("e4m3",)
        # and its heads in three power-of-two blocks where they split so (FLUX's 24: 3 x 8, no masked lanes); the
        # other layouts keep one padded block, which the tuned tables' choices were timed with
        if heads % 3 == 0 and (heads // 3) & (heads // 3 - 1) == 0:
            block_h, h_chunks = heads // 3, 3
    if grouped is not None:  # its own choice (other stores); the default layout's keys, and tables, stay as they were
        key += (f"grouped{groups}x{slices}",)
    with device_guard(qkv):
        _launch_qk_norm_rope(
            key, grid,
            qkv, txt, q_weight, k_weight, txt_q_weight, txt_k_weight, cos, sin, q, k, v, q_scale, k_scale,
            *batch_token_strides(qkv), *batch_token_strides(txt), cos.stride(0), sin.stride(0), *out_strides,
            text_tokens, image_tokens, heads, eps,
            HEAD_DIM=head_dim, BLOCK_H=block_h, HAS_TXT=has_txt, INT8_QK=int8_qk, GROUPED_OUT=grouped is not None,
            E4M3_QK=e4m3_qk, E4M3_BOUND=float(e4m3_bound or 1.0), H_CHUNKS=h_chunks,
        )  # fmt: skip
    if grouped is not None:
        return (packed,)
    return (q, q_scale, k, k_scale, v) if int8_qk or e4m3_qk else (q, k, v)


def _check_grouping(heads: int, groups: int, slices: int, int8_qk: bool = False, op: str = "qk_norm_rope_grouped"):
    if groups < 1 or slices < 1 or heads % (groups * slices):
        raise ValueError(
            f"{op}: {heads} heads do not split into {groups} groups of {slices} equal slices; "
            f"groups * slices must divide the heads (here one of {[d for d in range(1, heads + 1) if heads % d == 0]})"
        )
    if int8_qk:
        raise ValueError(f"{op}: int8 q and k have no grouped layout; call qk_norm_rope_int8")


@torch.library.custom_op("flux_kernels::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    eps: float = 1e-6,
    txt_qkv: torch.Tensor | None = None,
    txt_q_weight: torch.Tensor | None = None,
    txt_k_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return qk_norm_rope_fwd(qkv, q_weight, k_weight, cos, sin, heads, eps, txt_qkv, txt_q_weight, txt_k_weight)


@_qk_norm_rope_op.register_fake
def _qk_norm_rope_fake(
    qkv, q_weight, k_weight, cos, sin, heads, eps=1e-6, txt_qkv=None, txt_q_weight=None, txt_k_weight=None
):
    head_dim, text_tokens, image_tokens = _check_qk_norm_rope_inputs(
        qkv, q_weight, k_weight, cos, sin, heads, txt_qkv, txt_q_weight, txt_k_weight
    )
    shape = (qkv.shape[0], heads, text_tokens + image_tokens, head_dim)
    return qkv.new_empty(shape), qkv.new_empty(shape), qkv.new_empty(shape)


def qk_norm_rope(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    eps: float = 1e-6,
    txt_qkv: torch.Tensor | None = None,
    txt_q_weight: torch.Tensor | None = None,
    txt_k_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused QK-RMSNorm + rotary + [text, image] concat + head-major transpose, one pass.

    qkv: [B, L_img, 3*H*D] fused projection output (q|k|v, head-major); txt_qkv: [B, L_txt, 3*H*D] or None
    (placed first); cos/sin: [L_txt + L_img, D] from FluxPosEmbed -> q, k, v: [B, H, L_txt + L_img, D]
    contiguous, in qkv's dtype. The custom op `flux_kernels::qk_norm_rope` under torch.compile, a direct
    launch eagerly.
    """
    if torch.compiler.is_compiling():
        return _qk_norm_rope_op(qkv, q_weight, k_weight, cos, sin, heads, eps, txt_qkv, txt_q_weight, txt_k_weight)
    return qk_norm_rope_fwd(qkv, q_weight, k_weight, cos, sin, heads, eps, txt_qkv, txt_q_weight, txt_k_weight)


def pack_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, groups: int, slices: int) -> torch.Tensor:
    """q, k, v [B, H, L, D] -> qk_norm_rope_grouped's layout [slices, groups, L, 3, B, H / (groups * slices), D]
    (head h = (group * slices + slice) * H'' + i), by copies: the reference of the kernel's grouped stores."""
    batch, heads, tokens, head_dim = query.shape
    _check_grouping(heads, groups, slices, op="pack_heads")
    per_slice = heads // (groups * slices)
    # each [B, G, C, H'', L, D] -> [C, G, L, B, H'', D], stacked on a new dim 3
    parts = [t.reshape(batch, groups, slices, per_slice, tokens, head_dim).permute(2, 1, 4, 0, 3, 5) for t in
             (query, key, value)]  # fmt: skip
    return torch.stack(parts, dim=3).contiguous()


def qk_norm_rope_grouped_ref(*args, groups: int, slices: int, **kwargs) -> torch.Tensor:
    """qk_norm_rope_ref's q, k and v in qk_norm_rope_grouped's layout (pack_heads)."""
    return pack_heads(*qk_norm_rope_ref(*args, **kwargs), groups, slices)


@torch.library.custom_op("flux_kernels::qk_norm_rope_grouped", mutates_args=())
def _qk_norm_rope_grouped_op(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    eps: float,
    txt_qkv: torch.Tensor | None,
    txt_q_weight: torch.Tensor | None,
    txt_k_weight: torch.Tensor | None,
    groups: int,
    slices: int,
) -> torch.Tensor:
    args = (qkv, q_weight, k_weight, cos, sin, heads, eps, txt_qkv, txt_q_weight, txt_k_weight)
    return qk_norm_rope_fwd(*args, grouped=(groups, slices))[0]


@_qk_norm_rope_grouped_op.register_fake
def _qk_norm_rope_grouped_fake(
    qkv, q_weight, k_weight, cos, sin, heads, eps, txt_qkv, txt_q_weight, txt_k_weight, groups, slices
):
    q, _, _ = _qk_norm_rope_fake(qkv, q_weight, k_weight, cos, sin, heads, eps, txt_qkv, txt_q_weight, txt_k_weight)
    _check_grouping(heads, groups, slices)
    batch, _, tokens, head_dim = q.shape
    return q.new_empty(slices, groups, tokens, 3, batch, heads // (groups * slices), head_dim)


def qk_norm_rope_grouped(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    eps: float = 1e-6,
    txt_qkv: torch.Tensor | None = None,
    txt_q_weight: torch.Tensor | None = None,
    txt_k_weight: torch.Tensor | None = None,
    *,
    groups: int,
    slices: int = 1,
) -> torch.Tensor:
    """qk_norm_rope with q, k and v written in one tensor laid out for sending head groups to other ranks:
    [slices, groups, L, 3, B, H'', D] with H'' = H / (groups * slices) and head h = (group * slices + slice) * H''
    + i. Slice s of group g is then one contiguous [L, 3, B, H'', D] block and the groups of a slice are
    consecutive, so a Ulysses all-to-all sends packed[s] as it is (engine/parallel/exchange.py): the layout copies
    the exchange would otherwise make are these stores. Reference: qk_norm_rope_grouped_ref (pack_heads)."""
    args = (qkv, q_weight, k_weight, cos, sin, heads, eps, txt_qkv, txt_q_weight, txt_k_weight)
    if torch.compiler.is_compiling():
        return _qk_norm_rope_grouped_op(*args, groups, slices)
    return qk_norm_rope_fwd(*args, grouped=(groups, slices))[0]


@torch.library.custom_op("flux_kernels::qk_norm_rope_int8", mutates_args=())
def _qk_norm_rope_int8_op(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    eps: float = 1e-6,
    txt_qkv: torch.Tensor | None = None,
    txt_q_weight: torch.Tensor | None = None,
    txt_k_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return qk_norm_rope_fwd(qkv, q_weight, k_weight, cos, sin, heads, eps, txt_qkv, txt_q_weight, txt_k_weight, True)


@_qk_norm_rope_int8_op.register_fake
def _qk_norm_rope_int8_fake(
    qkv, q_weight, k_weight, cos, sin, heads, eps=1e-6, txt_qkv=None, txt_q_weight=None, txt_k_weight=None
):
    q, k, v = _qk_norm_rope_fake(qkv, q_weight, k_weight, cos, sin, heads, eps, txt_qkv, txt_q_weight, txt_k_weight)
    scale = q.new_empty(q.shape[:-1], dtype=torch.float32)
    return q.new_empty(q.shape, dtype=torch.int8), scale, k.new_empty(k.shape, dtype=torch.int8), scale.clone(), v


def qk_norm_rope_int8(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    eps: float = 1e-6,
    txt_qkv: torch.Tensor | None = None,
    txt_q_weight: torch.Tensor | None = None,
    txt_k_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """qk_norm_rope whose q and k leave as int8 codes with one fp32 scale per (token, head), for the quantised
    attention (flux_kernels.fp8_attention.fp8_attention_qk8): the normed, rotated fp32 values are quantised in
    registers, never written in bf16. -> (q8, q_scale, k8, k_scale, v): int8 [B, H, L, D], fp32 [B, H, L], and
    v as qk_norm_rope's. Reference: qk_norm_rope_int8_ref."""
    args = (qkv, q_weight, k_weight, cos, sin, heads, eps, txt_qkv, txt_q_weight, txt_k_weight)
    if torch.compiler.is_compiling():
        return _qk_norm_rope_int8_op(*args)
    return qk_norm_rope_fwd(*args, True)


def qk_norm_rope_int8_pairs(
    *args,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """qk_norm_rope_int8 as ((q8, q_scale), (k8, k_scale), v): the shape of qk_norm_rope's result, for callers that
    pass q, k, v on to an attention core (flux_kernels.fp8_attention.quantized_attention)."""
    q8, q_scale, k8, k_scale, v = qk_norm_rope_int8(*args)
    return (q8, q_scale), (k8, k_scale), v


def qk_norm_rope_int8_ref(*args, **kwargs) -> tuple[torch.Tensor, ...]:
    """qk_norm_rope_ref (fp32 throughout: upcast=True) with q and k quantised by quantize_int8_ref."""
    q, k, v = qk_norm_rope_ref(*args, **kwargs)
    return (*quantize_int8_ref(q), *quantize_int8_ref(k), v)


__all__ = [
    "pack_heads",
    "qk_norm_rope",
    "qk_norm_rope_fwd",
    "qk_norm_rope_grouped",
    "qk_norm_rope_grouped_ref",
    "qk_norm_rope_int8",
    "qk_norm_rope_int8_pairs",
    "qk_norm_rope_int8_ref",
    "qk_norm_rope_ref",
]
