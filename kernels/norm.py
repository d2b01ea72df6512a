"""Row-wise normalisation kernels of the FLUX blocks, each one pass over memory.

qk_norm_rope: fuses the fused-QKV split, the per-head RMSNorm of q and k (fp32 variance, weight [D]), the
    rotary embedding of q and k (diffusers' apply_rotary_emb, use_real, interleaved pairs), the text+image
    concatenation of the double-stream blocks, and the [B, L, H, D] -> [B, H, L, D] transpose that the
    attention kernel wants; v is only copied. Keeps fp32 through norm and rotary and rounds once. One program
    per token: its H heads of q, k, v are H * D contiguous elements, read as one [T, H, D] tile (16-byte
    vectors); the rotary partner comes from tl.split/tl.join of the same registers, not a second load.
layernorm_modulate: LayerNorm (no affine, fp32 statistics) * (1 + scale) + shift (adaLN modulation).
gated_residual_layernorm_modulate: residual = x + gate * y, then layernorm_modulate(residual); reads x and
    y once and writes both results. Both: a row (or two) of C per program, the grid's second axis the batch,
    so the [C] modulation vectors load once per program.
Tuned for: FLUX hidden C = 3072 (one masked block of 4096), H = 24 heads of D = 128, bf16, on H100
(L_txt = 512, L_img = 1024 / 4096 / 16384). Eager calls launch directly (custom ops only under torch.compile).
Limits: the last dim of every input must be contiguous (stride 1); C <= 16384; head_dim a power of two in
[16, 256]; bf16, fp16 or fp32 activations.
Measured (H100 80GB HBM3, 2026-11-26, benchmarks/results/norm-h100-80gb-hbm3-20261126-1800.json; GB/s from
CUDA-graph device time, % of the 3001 GB/s copy ceiling): qk_norm_rope 2615 / 2831 / 2911 (87 / 94 / 97%) at
L_img = 1024 / 4096 / 16384, torch.compile of the reference 871 / 1292 / 1360; layernorm_modulate 2350 (78%)
at (1, 4608, 3072) and 2647 (88%) at (1, 16896, 3072), torch.compile 1476 / 1536; gated_residual_layernorm_
modulate 2607 (87%) / 2813 (94%), torch.compile 2314 / 2544.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from flux_kernels import (
    TunedLaunch,
    check_runnable,
    device_guard,
    multiprocessor_count,
    new_output,
    triton_interpreting,
)
from flux_kernels.fp8 import FP8_DTYPE, quantize_fp8_rowwise

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_CHANNELS = 16384


def _check_last_dim_contiguous(op: str, name: str, x: torch.Tensor) -> None:
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ValueError(f"{op}: {name} has stride {x.stride(-1)} in its last dim; it must be 1 (call .contiguous())")


def _check_floating(op: str, name: str, x: torch.Tensor, device: torch.device) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{op}: {name} has dtype {x.dtype}; expected a floating dtype")
    if x.device != device:
        raise ValueError(f"{op}: {name} is on {x.device} but the activations are on {device}; use one device")


def _check_activation(op: str, name: str, x: torch.Tensor, ndim: int, layout: str) -> None:
    if x.dim() != ndim:
        raise ValueError(f"{op}: {name} has shape {tuple(x.shape)}; expected {ndim} dims {layout}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(
            f"{op}: {name} has dtype {x.dtype}; allowed: bfloat16, float16, float32 (cast with .to(torch.bfloat16))"
        )
    _check_last_dim_contiguous(op, name, x)


def _configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    # One config under the interpreter: the autotuner skips its timing runs only for a list of one.
    return [interpreter] if triton_interpreting() else gpu


# ============================================================================= (a) qk_norm_rope


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


_QK_NORM_ROPE_CONFIGS = _configs(
    [
        triton.Config({"BLOCK_T": tokens}, num_warps=warps, num_stages=1)
        for tokens, warps in ((1, 4), (1, 8), (2, 8))  # (1, 8) won at every FLUX shape; 16 warps lost
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
    stride_img_b,
    stride_img_l,
    stride_txt_b,
    stride_txt_l,
    stride_cos_l,
    stride_sin_l,
    L_txt,
    L_img,
    H,
    eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_TXT: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # BLOCK_T whole tokens per program: all H heads of q, k and v of a token are H * D contiguous elements of
    # its fused row, read as one [T, H, D] tile (16-byte vectors along D). Positions are in the joint
    # [text, image] sequence; a block may straddle the two segments.
    batch = tl.program_id(1).to(tl.int64)
    L_total = L_txt + L_img
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < L_total
    tokens = tl.where(token_ok, tokens, 0).to(tl.int64)  # masked tokens keep in-bounds addresses
    heads = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = token_ok[:, None, None] & (heads < H)[None, :, None]  # [T, H, 1]

    row = IMG + batch * stride_img_b + (tokens - L_txt) * stride_img_l  # [T] row starts
    weight_q = tl.load(Q_W + offs_d).to(tl.float32)[None, None, :]
    weight_k = tl.load(K_W + offs_d).to(tl.float32)[None, None, :]
    if HAS_TXT:
        is_txt = tokens < L_txt
        row = tl.where(is_txt, TXT + batch * stride_txt_b + tokens * stride_txt_l, row)
        is_txt = is_txt[:, None, None]
        weight_q = tl.where(is_txt, tl.load(TXT_Q_W + offs_d).to(tl.float32)[None, None, :], weight_q)
        weight_k = tl.where(is_txt, tl.load(TXT_K_W + offs_d).to(tl.float32)[None, None, :], weight_k)
    src = row[:, None, None] + (heads * HEAD_DIM)[None, :, None] + offs_d[None, None, :]  # [T, H, D] of q
    section = H * HEAD_DIM  # q | k | v sections of a fused row

    table_mask = token_ok[:, None, None]
    cos = tl.load(COS + tokens[:, None, None] * stride_cos_l + offs_d[None, None, :], mask=table_mask, other=0.0)
    sin = tl.load(SIN + tokens[:, None, None] * stride_sin_l + offs_d[None, None, :], mask=table_mask, other=0.0)
    cos_even, cos_odd = _pair_halves(cos.to(tl.float32), BLOCK_T, HEAD_DIM)
    sin_even, sin_odd = _pair_halves(sin.to(tl.float32), BLOCK_T, HEAD_DIM)

    # outputs [B, H, L_total, D]: each head of a token is one contiguous D-row
    dst = ((batch * H + heads)[None, :, None] * L_total + tokens[:, None, None]) * HEAD_DIM + offs_d[None, None, :]

    x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=2) / HEAD_DIM + eps)[:, :, None]
    q = _norm_rotate(x, rstd, weight_q, cos_even, cos_odd, sin_even, sin_odd, BLOCK_T, BLOCK_H, HEAD_DIM)
    tl.store(Q_OUT + dst, q.to(Q_OUT.dtype.element_ty), mask=mask)

    x = tl.load(src + section, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=2) / HEAD_DIM + eps)[:, :, None]
    k = _norm_rotate(x, rstd, weight_k, cos_even, cos_odd, sin_even, sin_odd, BLOCK_T, BLOCK_H, HEAD_DIM)
    tl.store(K_OUT + dst, k.to(K_OUT.dtype.element_ty), mask=mask)

    v = tl.load(src + 2 * section, mask=mask)
    tl.store(V_OUT + dst, v, mask=mask)


_launch_qk_norm_rope = TunedLaunch(_qk_norm_rope_fwd_kernel)


def _check_qk_norm_rope_inputs(qkv, q_weight, k_weight, cos, sin, heads, txt_qkv, txt_q_weight, txt_k_weight):
    op = "qk_norm_rope"
    _check_activation(op, "qkv", qkv, 3, "[B, L_img, 3*H*D]")
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
        _check_activation(op, "txt_qkv", txt_qkv, 3, "[B, L_txt, 3*H*D]")
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
        _check_floating(op, name, weight, qkv.device)
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
        _check_floating(op, name, table, qkv.device)
        if table.shape != (total, head_dim):
            raise ValueError(
                f"{op}: {name} has shape {tuple(table.shape)}; expected [L_txt + L_img, head_dim] = "
                f"[{total}, {head_dim}] as FluxPosEmbed returns for the text and image ids"
            )
        _check_last_dim_contiguous(op, name, table)
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


def _batch_token_strides(x: torch.Tensor) -> tuple[int, int]:
    """(batch, token) strides of [B, L, W], those of size-1 dims replaced by values that are never stepped
    along but keep both segments' strides the same integer type in the kernel (a stride of 1 would become
    a compile-time constant)."""
    batch, tokens, width = x.shape
    return (x.stride(0) if batch > 1 else 0, x.stride(1) if tokens > 1 else width)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks, allocates and launches; see qk_norm_rope."""
    args = (qkv, q_weight, k_weight, cos, sin, heads, txt_qkv, txt_q_weight, txt_k_weight)
    head_dim, text_tokens, image_tokens = _qk_norm_rope_fast_check(*args) or _check_qk_norm_rope_inputs(*args)
    if not qkv.is_cuda:
        check_runnable(qkv.device, "qk_norm_rope")
    batch, total = qkv.shape[0], text_tokens + image_tokens
    q, k, v = (new_output(batch, heads, total, head_dim, dtype=qkv.dtype, device=qkv.device) for _ in range(3))
    has_txt = txt_qkv is not None
    txt = txt_qkv if has_txt else qkv  # never read when has_txt is False
    txt_q_weight, txt_k_weight = (txt_q_weight, txt_k_weight) if has_txt else (q_weight, k_weight)

    def grid(meta):
        return (triton.cdiv(total, meta["BLOCK_T"]), batch)

    key = (text_tokens, image_tokens, heads, head_dim, qkv.dtype, q_weight.dtype, cos.dtype, sin.dtype)
    with device_guard(qkv):
        _launch_qk_norm_rope(
            key, grid,
            qkv, txt, q_weight, k_weight, txt_q_weight, txt_k_weight, cos, sin, q, k, v,
            *_batch_token_strides(qkv), *_batch_token_strides(txt), cos.stride(0), sin.stride(0),
            text_tokens, image_tokens, heads, eps,
            HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(heads), HAS_TXT=has_txt,
        )  # fmt: skip
    return q, k, v


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


# ============================================================================= (b), (c) layernorm + modulate


def layernorm_modulate_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, upcast: bool = True
) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale[:, None]) + shift[:, None] as diffusers writes it (norm2 + modulation).
    x: [B, L, C], shift/scale: [B, C]. upcast=True computes in fp32 and returns fp32."""
    if upcast:
        x, shift, scale = x.float(), shift.float(), scale.float()
    normed = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return normed * (1 + scale[:, None]) + shift[:, None]


def gated_residual_layernorm_modulate_ref(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual = x + gate[:, None] * y; normed = layernorm_modulate_ref(residual, shift, scale).
    x, y: [B, L, C]; gate/shift/scale: [B, C]."""
    if upcast:
        x, y, gate = x.float(), y.float(), gate.float()
    residual = x + gate[:, None] * y
    return residual, layernorm_modulate_ref(residual, shift, scale, eps, upcast=upcast)


def layernorm_modulate_fp8_ref(x, shift, scale, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8_rowwise(layernorm_modulate_ref(x, shift, scale, eps)) of the fp32 result: (e4m3 [B, L, C],
    fp32 scales [B, L, 1])."""
    return quantize_fp8_rowwise(layernorm_modulate_ref(x, shift, scale, eps))


def gated_residual_layernorm_modulate_fp8_ref(x, y, gate, shift, scale, eps: float = 1e-6):
    """(residual fp32, e4m3 [B, L, C], fp32 scales [B, L, 1]) of gated_residual_layernorm_modulate_ref in fp32."""
    residual, normed = gated_residual_layernorm_modulate_ref(x, y, gate, shift, scale, eps)
    return (residual, *quantize_fp8_rowwise(normed))


@triton.jit
def _modulated_layernorm(x, shift, scale_plus_one, col_mask, C, eps):
    # x: [BLOCK_ROWS, BLOCK_C] fp32 with masked columns = 0; statistics in two passes, as torch does
    mean = tl.sum(x, axis=1) / C
    centered = tl.where(col_mask, x - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.sum(centered * centered, axis=1) / C + eps)
    return centered * rstd[:, None] * scale_plus_one + shift


# fp8 outputs (the *_fp8 ops): e4m3 values and one fp32 scale per token, as kernels.fp8.quantize_fp8_rowwise
# computes them (scale = amax / 448, floored at the smallest normal fp32; round-to-nearest-even), but from the fp32
# normalised row: no bf16 rounding in between. The values are multiplied by the row's reciprocal scale, not divided
# by the scale: an IEEE division per element (div_rn) made the kernel 2x slower than the bf16 one on an H100
# (162 vs 80 us at L=16896); the product is within an fp32 ulp of the quotient, so an e4m3 code differs only where
# the quotient sits on a rounding boundary (the tests allow one code off, rarely). Non-finite inputs: a NaN value
# stays NaN (the clamp propagates it, so the fp8 GEMM's output row is NaN, as with quantize_fp8_rowwise) but the
# row's scale and its other values stay finite (tl.max skips NaN), where quantize_fp8_rowwise makes them NaN too.
E4M3_MAX = tl.constexpr(448.0)
FP8_MIN_SCALE = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny


@triton.jit
def e4m3_scale(amax):
    """(scale, 1 / scale) of a token from its fp32 amax: amax / 448, floored at the smallest normal fp32."""
    scale = tl.maximum(tl.math.div_rn(amax, E4M3_MAX), FP8_MIN_SCALE)
    return scale, tl.math.div_rn(1.0, scale)


@triton.jit
def e4m3(values, inverse_scale, dtype: tl.constexpr):
    """fp32 values times their token's 1 / scale, clamped to +-448 (NaN kept), rounded to nearest even e4m3."""
    q = tl.clamp(values * inverse_scale, -E4M3_MAX, E4M3_MAX, propagate_nan=tl.PropagateNan.ALL)
    return q.to(dtype, fp_downcast_rounding="rtne")


@triton.jit
def _store_normed(OUT, OUT_SCALE, offsets, scale_offsets, out, mask, row_mask, QUANT_FP8: tl.constexpr):
    # out: [BLOCK_ROWS, BLOCK_C] fp32, masked columns 0 (so they do not move the amax)
    if QUANT_FP8:
        row_scale, inverse = e4m3_scale(tl.max(tl.abs(out), axis=1)[:, None])
        tl.store(OUT + offsets, e4m3(out, inverse, OUT.dtype.element_ty), mask=mask)
        tl.store(OUT_SCALE + scale_offsets, row_scale, mask=row_mask)
    else:
        tl.store(OUT + offsets, out.to(OUT.dtype.element_ty), mask=mask)


def _layernorm_config(rows: int, warps: int, programs_per_sm: int = 0, stages: int = 1) -> triton.Config:
    return triton.Config({"BLOCK_ROWS": rows, "PROGRAMS_PER_SM": programs_per_sm}, num_warps=warps, num_stages=stages)


# Rows of C = 3072 (BLOCK_C 4096, the last quarter masked). PROGRAMS_PER_SM = 0: one row block per program;
# > 0: a persistent grid of that many programs per SM per batch element, each loading the [C] modulation
# vectors once and looping over row blocks (stages 2: the next rows load while this one is normalised).
_LAYERNORM_CONFIGS = _configs(
    [
        _layernorm_config(1, 4),  # gated_residual_layernorm_modulate's pick at L = 4608 and 16896
        _layernorm_config(1, 8),
        _layernorm_config(2, 8),  # layernorm_modulate's pick at L = 4608 and 16896
        _layernorm_config(1, 4, programs_per_sm=8, stages=2),  # persistent: within 1-3% of the best
        _layernorm_config(1, 4, programs_per_sm=16),
    ],
    # several rows per program (the interpreter's cost is per program) on a persistent grid, so CPU tests
    # run the loop too
    interpreter=_layernorm_config(16, 4, programs_per_sm=1),
)


def _prune_layernorm_configs(configs, named_args, **kwargs):
    # at most 32 fp32 values of one row tile per thread (more spills), and not under 4 (idle lanes)
    block_c = {**named_args, **kwargs}["BLOCK_C"]
    kept = [c for c in configs if 4 * 32 * c.num_warps <= c.kwargs["BLOCK_ROWS"] * block_c <= 32 * 32 * c.num_warps]
    return kept or configs[:1]


@triton.autotune(
    configs=_LAYERNORM_CONFIGS, key=["B", "L", "C"], prune_configs_by={"early_config_prune": _prune_layernorm_configs}
)
@triton.jit
def _layernorm_modulate_fwd_kernel(
    X,
    SHIFT,
    SCALE,
    OUT,
    OUT_SCALE,
    stride_x_b,
    stride_x_l,
    stride_shift_b,
    stride_scale_b,
    B,
    L,
    C,
    eps,
    BLOCK_C: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,
    QUANT_FP8: tl.constexpr,
):
    # grid: (row-block programs, B); every program stays in one batch element, so shift/scale load once
    batch = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)[None, :]
    col_mask = cols < C
    shift = tl.load(SHIFT + batch * stride_shift_b + cols, mask=col_mask, other=0.0).to(tl.float32)
    scale_plus_one = tl.load(SCALE + batch * stride_scale_b + cols, mask=col_mask, other=0.0).to(tl.float32) + 1.0
    x_rows = X + batch * stride_x_b
    out_offset = batch * L * C  # outputs are contiguous [B, L, C] (and [B, L, 1] scales)
    for block in tl.range(tl.program_id(0), tl.cdiv(L, BLOCK_ROWS), tl.num_programs(0)):
        rows = (block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)[:, None]
        mask = (rows < L) & col_mask
        x = tl.load(x_rows + rows * stride_x_l + cols, mask=mask, other=0.0, eviction_policy="evict_first")
        out = _modulated_layernorm(x.to(tl.float32), shift, scale_plus_one, col_mask, C, eps)
        _store_normed(OUT, OUT_SCALE, out_offset + rows * C + cols, batch * L + rows, out, mask, rows < L, QUANT_FP8)


@triton.autotune(
    configs=_LAYERNORM_CONFIGS, key=["B", "L", "C"], prune_configs_by={"early_config_prune": _prune_layernorm_configs}
)
@triton.jit
def _gated_residual_layernorm_modulate_fwd_kernel(
    X,
    Y,
    GATE,
    SHIFT,
    SCALE,
    RESIDUAL,
    OUT,
    OUT_SCALE,
    stride_x_b,
    stride_x_l,
    stride_y_b,
    stride_y_l,
    stride_gate_b,
    stride_shift_b,
    stride_scale_b,
    B,
    L,
    C,
    eps,
    BLOCK_C: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,
    QUANT_FP8: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)[None, :]
    col_mask = cols < C
    gate = tl.load(GATE + batch * stride_gate_b + cols, mask=col_mask, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + batch * stride_shift_b + cols, mask=col_mask, other=0.0).to(tl.float32)
    scale_plus_one = tl.load(SCALE + batch * stride_scale_b + cols, mask=col_mask, other=0.0).to(tl.float32) + 1.0
    x_rows = X + batch * stride_x_b
    y_rows = Y + batch * stride_y_b
    out_offset = batch * L * C  # outputs are contiguous [B, L, C]
    for block in tl.range(tl.program_id(0), tl.cdiv(L, BLOCK_ROWS), tl.num_programs(0)):
        rows = (block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)[:, None]
        mask = (rows < L) & col_mask
        x = tl.load(x_rows + rows * stride_x_l + cols, mask=mask, other=0.0, eviction_policy="evict_first")
        y = tl.load(y_rows + rows * stride_y_l + cols, mask=mask, other=0.0, eviction_policy="evict_first")
        residual = x.to(tl.float32) + gate * y.to(tl.float32)  # fp32; normalised before rounding: one rounding each
        out = _modulated_layernorm(residual, shift, scale_plus_one, col_mask, C, eps)
        out_offsets = out_offset + rows * C + cols
        tl.store(RESIDUAL + out_offsets, residual.to(RESIDUAL.dtype.element_ty), mask=mask)
        _store_normed(OUT, OUT_SCALE, out_offsets, batch * L + rows, out, mask, rows < L, QUANT_FP8)


def _row_grid(batch: int, tokens: int, device: torch.device):
    def grid(meta):
        blocks = triton.cdiv(tokens, meta["BLOCK_ROWS"])
        per_sm = meta["PROGRAMS_PER_SM"]
        return (min(blocks, per_sm * multiprocessor_count(device)) if per_sm else blocks, batch)

    return grid


def _check_modulation(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    _check_floating(op, name, t, x.device)
    if t.shape != (x.shape[0], x.shape[2]):
        raise ValueError(
            f"{op}: {name} has shape {tuple(t.shape)}; expected [B, C] = [{x.shape[0]}, {x.shape[2]}] "
            "(one row of the adaLN embedding per batch element)"
        )
    _check_last_dim_contiguous(op, name, t)


def _check_layernorm_inputs(op: str, x: torch.Tensor, **modulation: torch.Tensor) -> None:
    _check_activation(op, "x", x, 3, "[B, L, C]")
    if min(x.shape) < 1:
        raise ValueError(f"{op}: x {tuple(x.shape)} is empty; need B, L, C >= 1")
    if x.shape[2] > MAX_CHANNELS:
        raise ValueError(f"{op}: C = {x.shape[2]} is above the {MAX_CHANNELS} one block holds; use the _ref op")
    for name, t in modulation.items():
        _check_modulation(op, name, t, x)


def _layernorm_fast_check(x: torch.Tensor, *modulation: torch.Tensor) -> bool:
    """True for a valid call, in few attribute reads; False sends it through the full checks (and their
    messages). Accepts nothing that _check_layernorm_inputs refuses."""
    shape = x.shape
    if len(shape) != 3 or x.dtype not in ACTIVATION_DTYPES or x.stride()[2] != 1:
        return False
    batch, tokens, channels = shape
    if batch < 1 or tokens < 1 or not 1 <= channels <= MAX_CHANNELS:
        return False
    device, rows = x.device, (batch, channels)
    for t in modulation:
        if t.shape != rows or t.stride()[1] != 1 or not t.is_floating_point() or t.device != device:
            return False
    return True


_launch_layernorm_modulate = TunedLaunch(_layernorm_modulate_fwd_kernel)
_launch_gated_residual_layernorm_modulate = TunedLaunch(_gated_residual_layernorm_modulate_fwd_kernel)


def _normed_outputs(x: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised output ([B, L, C] in x's dtype, or e4m3) and its per-token fp32 scales ([B, L, 1]; with
    fp8 off, a placeholder the kernel never touches)."""
    batch, tokens, channels = x.shape
    out = new_output(batch, tokens, channels, dtype=FP8_DTYPE if fp8 else x.dtype, device=x.device)
    return out, new_output(batch, tokens, 1, dtype=torch.float32, device=x.device) if fp8 else out


def layernorm_modulate_fwd(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, fp8: bool = False
):
    """Checks, allocates and launches; see layernorm_modulate (fp8: layernorm_modulate_fp8)."""
    if not _layernorm_fast_check(x, shift, scale):
        _check_layernorm_inputs("layernorm_modulate", x, shift=shift, scale=scale)
    if not x.is_cuda:
        check_runnable(x.device, "layernorm_modulate")
    batch, tokens, channels = x.shape
    out, out_scale = _normed_outputs(x, fp8)
    x_strides, key = x.stride(), (batch, tokens, channels, x.dtype, shift.dtype, scale.dtype, fp8)
    with device_guard(x):
        _launch_layernorm_modulate(
            key, _row_grid(batch, tokens, x.device),
            x, shift, scale, out, out_scale, x_strides[0], x_strides[1], shift.stride()[0], scale.stride()[0],
            batch, tokens, channels, eps, BLOCK_C=triton.next_power_of_2(channels), QUANT_FP8=fp8,
        )  # fmt: skip
    return (out, out_scale) if fp8 else out


@torch.library.custom_op("flux_kernels::layernorm_modulate", mutates_args=())
def _layernorm_modulate_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    return layernorm_modulate_fwd(x, shift, scale, eps)


@_layernorm_modulate_op.register_fake
def _layernorm_modulate_fake(x, shift, scale, eps=1e-6):
    _check_layernorm_inputs("layernorm_modulate", x, shift=shift, scale=scale)
    return x.new_empty(x.shape)


@torch.library.custom_op("flux_kernels::layernorm_modulate_fp8", mutates_args=())
def _layernorm_modulate_fp8_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    return layernorm_modulate_fwd(x, shift, scale, eps, fp8=True)


@_layernorm_modulate_fp8_op.register_fake
def _layernorm_modulate_fp8_fake(x, shift, scale, eps=1e-6):
    _check_layernorm_inputs("layernorm_modulate_fp8", x, shift=shift, scale=scale)
    return x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty((*x.shape[:2], 1), dtype=torch.float32)


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm(x, no affine, fp32 statistics) * (1 + scale[:, None]) + shift[:, None], in x's dtype.
    x: [B, L, C]; shift, scale: [B, C] (views of the adaLN embedding chunks are fine). The custom op
    `flux_kernels::layernorm_modulate` under torch.compile, a direct launch eagerly."""
    if torch.compiler.is_compiling():
        return _layernorm_modulate_op(x, shift, scale, eps)
    return layernorm_modulate_fwd(x, shift, scale, eps)


def layernorm_modulate_fp8(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """layernorm_modulate quantised per token for an fp8 GEMM in the same pass: (q float8_e4m3fn [B, L, C],
    scale fp32 [B, L, 1]) with q * scale ~= the fp32 result (engine.quantize.quantize_fp8_rowwise's arithmetic,
    without rounding to x's dtype first). The custom op `flux_kernels::layernorm_modulate_fp8` under
    torch.compile, a direct launch eagerly."""
    if torch.compiler.is_compiling():
        return _layernorm_modulate_fp8_op(x, shift, scale, eps)
    return layernorm_modulate_fwd(x, shift, scale, eps, fp8=True)


def _check_gated_inputs(x, y, gate, shift, scale) -> None:
    op = "gated_residual_layernorm_modulate"
    _check_layernorm_inputs(op, x, gate=gate, shift=shift, scale=scale)
    _check_activation(op, "y", y, 3, "[B, L, C]")
    if y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError(f"{op}: y is {tuple(y.shape)} {y.dtype} but x is {tuple(x.shape)} {x.dtype}; they must match")
    _check_floating(op, "y", y, x.device)


def gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps: float = 1e-6, fp8: bool = False):
    """Checks, allocates and launches; see gated_residual_layernorm_modulate (fp8: its _fp8 variant)."""
    y_ok = y.shape == x.shape and y.dtype == x.dtype and y.stride()[2] == 1 and y.device == x.device
    if not (y_ok and _layernorm_fast_check(x, gate, shift, scale)):
        _check_gated_inputs(x, y, gate, shift, scale)
    if not x.is_cuda:
        check_runnable(x.device, "gated_residual_layernorm_modulate")
    batch, tokens, channels = x.shape
    residual = new_output(batch, tokens, channels, dtype=x.dtype, device=x.device)
    out, out_scale = _normed_outputs(x, fp8)
    x_strides, y_strides = x.stride(), y.stride()
    key = (batch, tokens, channels, x.dtype, gate.dtype, shift.dtype, scale.dtype, fp8)
    with device_guard(x):
        _launch_gated_residual_layernorm_modulate(
            key, _row_grid(batch, tokens, x.device),
            x, y, gate, shift, scale, residual, out, out_scale,
            x_strides[0], x_strides[1], y_strides[0], y_strides[1],
            gate.stride()[0], shift.stride()[0], scale.stride()[0],
            batch, tokens, channels, eps, BLOCK_C=triton.next_power_of_2(channels), QUANT_FP8=fp8,
        )  # fmt: skip
    return (residual, out, out_scale) if fp8 else (residual, out)


@torch.library.custom_op("flux_kernels::gated_residual_layernorm_modulate", mutates_args=())
def _gated_residual_layernorm_modulate_op(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    return gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps)


@_gated_residual_layernorm_modulate_op.register_fake
def _gated_residual_layernorm_modulate_fake(x, y, gate, shift, scale, eps=1e-6):
    _check_gated_inputs(x, y, gate, shift, scale)
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op("flux_kernels::gated_residual_layernorm_modulate_fp8", mutates_args=())
def _gated_residual_layernorm_modulate_fp8_op(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps, fp8=True)


@_gated_residual_layernorm_modulate_fp8_op.register_fake
def _gated_residual_layernorm_modulate_fp8_fake(x, y, gate, shift, scale, eps=1e-6):
    _check_gated_inputs(x, y, gate, shift, scale)
    scales = x.new_empty((*x.shape[:2], 1), dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=FP8_DTYPE), scales


def gated_residual_layernorm_modulate(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual = x + gate[:, None] * y; normed = layernorm_modulate(residual, shift, scale). One pass.
    x, y: [B, L, C] (same dtype); gate, shift, scale: [B, C] -> (residual, normed), both [B, L, C] in x's dtype.
    The custom op `flux_kernels::gated_residual_layernorm_modulate` under torch.compile, a direct launch eagerly."""
    if torch.compiler.is_compiling():
        return _gated_residual_layernorm_modulate_op(x, y, gate, shift, scale, eps)
    return gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps)


def gated_residual_layernorm_modulate_fp8(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gated_residual_layernorm_modulate with the normalised output quantised per token for an fp8 GEMM:
    (residual [B, L, C] in x's dtype, q float8_e4m3fn [B, L, C], scale fp32 [B, L, 1]); see
    layernorm_modulate_fp8. The custom op `flux_kernels::gated_residual_layernorm_modulate_fp8` under
    torch.compile, a direct launch eagerly."""
    if torch.compiler.is_compiling():
        return _gated_residual_layernorm_modulate_fp8_op(x, y, gate, shift, scale, eps)
    return gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps, fp8=True)


__all__ = [
    "gated_residual_layernorm_modulate",
    "gated_residual_layernorm_modulate_fp8",
    "gated_residual_layernorm_modulate_fp8_ref",
    "gated_residual_layernorm_modulate_fwd",
    "gated_residual_layernorm_modulate_ref",
    "layernorm_modulate",
    "layernorm_modulate_fp8",
    "layernorm_modulate_fp8_ref",
    "layernorm_modulate_fwd",
    "layernorm_modulate_ref",
    "qk_norm_rope",
    "qk_norm_rope_fwd",
    "qk_norm_rope_ref",
]
