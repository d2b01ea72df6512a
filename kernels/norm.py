"""Row-wise normalisation kernels of the FLUX blocks, each one pass over memory.

qk_norm_rope: fuses the fused-QKV split, the per-head RMSNorm of q and k (fp32 variance, weight [D]), the
    rotary embedding of q and k (diffusers' apply_rotary_emb, use_real, interleaved pairs), the text+image
    concatenation of the double-stream blocks, and the [B, L, H, D] -> [B, H, L, D] transpose that the
    attention kernel wants; v is only copied. Keeps fp32 through norm and rotary and rounds once.
layernorm_modulate: LayerNorm (no affine, fp32 statistics) * (1 + scale) + shift (adaLN modulation).
gated_residual_layernorm_modulate: residual = x + gate * y, then layernorm_modulate(residual); reads x and
    y once and writes both results.
Tuned for: FLUX hidden C = 3072 in one block per row, H = 24 heads of D = 128, bf16, on H100
(L_txt = 512, L_img = 1024 / 4096 / 16384).
Limits: the last dim of every input must be contiguous (stride 1); C <= 16384; head_dim a power of two in
[16, 256]; bf16, fp16 or fp32 activations.
Measured: (pending GPU run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import check_runnable, device_guard, new_output, triton_interpreting

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
def _rms_norm_rotary(src, weight_ptr, offs_d, swap_d, cos, sin_signed, mask, eps, HEAD_DIM: tl.constexpr):
    # src: [ROWS, 1] pointers to the first element of one head of q or k; returns fp32 [ROWS, D]
    x = tl.load(src + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    x_pair = tl.load(src + swap_d[None, :], mask=mask, other=0.0).to(tl.float32)  # the other of each pair
    weight = tl.load(weight_ptr + offs_d).to(tl.float32)
    weight_pair = tl.load(weight_ptr + swap_d).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
    # out[d] = n[d] cos[d] + sign(d) n[d ^ 1] sin[d] with n = x * rstd * weight, sign -1 on even d
    return (x * weight[None, :] * cos + x_pair * weight_pair[None, :] * sin_signed) * rstd


_QK_NORM_ROPE_CONFIGS = _configs(
    [
        triton.Config({"BLOCK_ROWS": rows}, num_warps=warps, num_stages=1)
        for rows, warps in ((32, 4), (16, 4), (32, 8), (64, 8), (64, 16))
    ],
    interpreter=triton.Config({"BLOCK_ROWS": 128}, num_warps=4, num_stages=1),
)


@triton.autotune(configs=_QK_NORM_ROPE_CONFIGS, key=["H", "HEAD_DIM", "HAS_TXT"])
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
    HAS_TXT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    # Rows are (token, head) pairs of one segment, token-major: BLOCK_ROWS consecutive pairs per program,
    # the text segment's blocks first. A block never straddles the two segments.
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    src = IMG + batch * stride_img_b
    stride_l = stride_img_l
    q_weight = Q_W
    k_weight = K_W
    first_pair = pid * BLOCK_ROWS
    segment_pairs = L_img * H
    token_offset = L_txt  # position of the segment's first token in the joint sequence
    if HAS_TXT:
        text_blocks = tl.cdiv(L_txt * H, BLOCK_ROWS)
        if pid < text_blocks:
            src = TXT + batch * stride_txt_b
            stride_l = stride_txt_l
            q_weight = TXT_Q_W
            k_weight = TXT_K_W
            segment_pairs = L_txt * H
            token_offset = 0
        else:
            first_pair = (pid - text_blocks) * BLOCK_ROWS
    pairs = first_pair + tl.arange(0, BLOCK_ROWS)
    row_mask = (pairs < segment_pairs)[:, None]
    pairs = tl.where(pairs < segment_pairs, pairs, 0)  # keep masked rows' addresses in bounds
    token = pairs // H
    head = pairs % H
    offs_d = tl.arange(0, HEAD_DIM)
    swap_d = offs_d ^ 1

    position = (token_offset + token).to(tl.int64)[:, None]  # [ROWS, 1] in the joint sequence
    cos = tl.load(COS + position * stride_cos_l + offs_d[None, :], mask=row_mask, other=0.0).to(tl.float32)
    sin = tl.load(SIN + position * stride_sin_l + offs_d[None, :], mask=row_mask, other=0.0).to(tl.float32)
    sin_signed = tl.where(offs_d[None, :] % 2 == 0, -sin, sin)

    section = H * HEAD_DIM  # q | k | v sections of a fused row
    src_rows = (src + token.to(tl.int64) * stride_l + head * HEAD_DIM)[:, None]
    L_total = L_txt + L_img
    dst_rows = (((batch * H + head) * L_total).to(tl.int64)[:, None] + position) * HEAD_DIM + offs_d[None, :]

    q = _rms_norm_rotary(src_rows, q_weight, offs_d, swap_d, cos, sin_signed, row_mask, eps, HEAD_DIM)
    tl.store(Q_OUT + dst_rows, q.to(Q_OUT.dtype.element_ty), mask=row_mask)
    k = _rms_norm_rotary(src_rows + section, k_weight, offs_d, swap_d, cos, sin_signed, row_mask, eps, HEAD_DIM)
    tl.store(K_OUT + dst_rows, k.to(K_OUT.dtype.element_ty), mask=row_mask)
    v = tl.load(src_rows + 2 * section + offs_d[None, :], mask=row_mask)
    tl.store(V_OUT + dst_rows, v, mask=row_mask)


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
    head_dim, text_tokens, image_tokens = _check_qk_norm_rope_inputs(
        qkv, q_weight, k_weight, cos, sin, heads, txt_qkv, txt_q_weight, txt_k_weight
    )
    check_runnable(qkv.device, "qk_norm_rope")
    batch, total = qkv.shape[0], text_tokens + image_tokens
    q, k, v = (new_output(batch, heads, total, head_dim, dtype=qkv.dtype, device=qkv.device) for _ in range(3))
    has_txt = txt_qkv is not None
    txt = txt_qkv if has_txt else qkv  # never read when has_txt is False
    txt_q_weight, txt_k_weight = (txt_q_weight, txt_k_weight) if has_txt else (q_weight, k_weight)

    def grid(meta):
        rows = meta["BLOCK_ROWS"]
        return (triton.cdiv(text_tokens * heads, rows) + triton.cdiv(image_tokens * heads, rows), batch)

    with device_guard(qkv):
        _qk_norm_rope_fwd_kernel[grid](
            qkv, txt, q_weight, k_weight, txt_q_weight, txt_k_weight, cos, sin, q, k, v,
            *_batch_token_strides(qkv), *_batch_token_strides(txt), cos.stride(0), sin.stride(0),
            text_tokens, image_tokens, heads, eps,
            HEAD_DIM=head_dim, HAS_TXT=has_txt,
        )  # fmt: skip
    return q, k, v


@torch.library.custom_op("flux_kernels::qk_norm_rope", mutates_args=())
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
    contiguous, in qkv's dtype.
    """
    return qk_norm_rope_fwd(qkv, q_weight, k_weight, cos, sin, heads, eps, txt_qkv, txt_q_weight, txt_k_weight)


@qk_norm_rope.register_fake
def _qk_norm_rope_fake(
    qkv, q_weight, k_weight, cos, sin, heads, eps=1e-6, txt_qkv=None, txt_q_weight=None, txt_k_weight=None
):
    head_dim, text_tokens, image_tokens = _check_qk_norm_rope_inputs(
        qkv, q_weight, k_weight, cos, sin, heads, txt_qkv, txt_q_weight, txt_k_weight
    )
    shape = (qkv.shape[0], heads, text_tokens + image_tokens, head_dim)
    return qkv.new_empty(shape), qkv.new_empty(shape), qkv.new_empty(shape)


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


@triton.jit
def _modulated_layernorm(x, shift, scale, col_mask, C, eps):
    # x: [BLOCK_ROWS, BLOCK_C] fp32 with masked columns = 0; statistics in two passes, as torch does
    mean = tl.sum(x, axis=1) / C
    centered = tl.where(col_mask, x - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.sum(centered * centered, axis=1) / C + eps)
    return centered * rstd[:, None] * (1.0 + scale) + shift


@triton.jit
def _row_block(pid, L, n_rows, BLOCK_ROWS: tl.constexpr):
    """Rows of this program: (row index clamped into range, validity mask, batch index) of [B, L] rows."""
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    valid = rows < n_rows
    rows = tl.where(valid, rows, n_rows - 1)  # out-of-range rows reread the last one and are never stored
    return rows, valid, (rows // L).to(tl.int64)


@triton.jit
def _row_starts(rows, L, stride_b, stride_l):
    return (rows // L).to(tl.int64) * stride_b + (rows % L).to(tl.int64) * stride_l


_LAYERNORM_CONFIGS = _configs(
    [
        triton.Config({"BLOCK_ROWS": rows}, num_warps=warps, num_stages=1)
        for rows, warps in ((1, 8), (1, 4), (1, 16), (2, 8), (2, 16), (4, 16))
    ],
    # several rows per program: the interpreter's cost is per program
    interpreter=triton.Config({"BLOCK_ROWS": 8}, num_warps=4, num_stages=1),
)


def _prune_layernorm_configs(configs, named_args, **kwargs):
    # at most 32 fp32 values of one row tile per thread: more spills to local memory
    block_c = {**named_args, **kwargs}["BLOCK_C"]
    kept = [c for c in configs if c.kwargs["BLOCK_ROWS"] * block_c <= 32 * 32 * c.num_warps]
    return kept or configs[:1]


@triton.autotune(
    configs=_LAYERNORM_CONFIGS, key=["C"], prune_configs_by={"early_config_prune": _prune_layernorm_configs}
)
@triton.jit
def _layernorm_modulate_fwd_kernel(
    X,
    SHIFT,
    SCALE,
    OUT,
    stride_x_b,
    stride_x_l,
    stride_shift_b,
    stride_scale_b,
    L,
    n_rows,
    C,
    eps,
    BLOCK_C: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    rows, valid, batch = _row_block(tl.program_id(0), L, n_rows, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_C)[None, :]
    col_mask = cols < C
    x = tl.load(X + _row_starts(rows, L, stride_x_b, stride_x_l)[:, None] + cols, mask=col_mask, other=0.0).to(
        tl.float32
    )
    shift = tl.load(SHIFT + batch[:, None] * stride_shift_b + cols, mask=col_mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + batch[:, None] * stride_scale_b + cols, mask=col_mask, other=0.0).to(tl.float32)
    out = _modulated_layernorm(x, shift, scale, col_mask, C, eps)
    out_offsets = rows.to(tl.int64)[:, None] * C + cols  # outputs are contiguous [B, L, C]
    tl.store(OUT + out_offsets, out.to(OUT.dtype.element_ty), mask=col_mask & valid[:, None])


@triton.autotune(
    configs=_LAYERNORM_CONFIGS, key=["C"], prune_configs_by={"early_config_prune": _prune_layernorm_configs}
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
    stride_x_b,
    stride_x_l,
    stride_y_b,
    stride_y_l,
    stride_gate_b,
    stride_shift_b,
    stride_scale_b,
    L,
    n_rows,
    C,
    eps,
    BLOCK_C: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    rows, valid, batch = _row_block(tl.program_id(0), L, n_rows, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_C)[None, :]
    col_mask = cols < C
    x = tl.load(X + _row_starts(rows, L, stride_x_b, stride_x_l)[:, None] + cols, mask=col_mask, other=0.0)
    y = tl.load(Y + _row_starts(rows, L, stride_y_b, stride_y_l)[:, None] + cols, mask=col_mask, other=0.0)
    x, y = x.to(tl.float32), y.to(tl.float32)
    gate = tl.load(GATE + batch[:, None] * stride_gate_b + cols, mask=col_mask, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + batch[:, None] * stride_shift_b + cols, mask=col_mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + batch[:, None] * stride_scale_b + cols, mask=col_mask, other=0.0).to(tl.float32)
    residual = x + gate * y  # fp32; normalised before rounding, so both outputs round once
    out = _modulated_layernorm(residual, shift, scale, col_mask, C, eps)
    out_offsets = rows.to(tl.int64)[:, None] * C + cols  # outputs are contiguous [B, L, C]
    store_mask = col_mask & valid[:, None]
    tl.store(RESIDUAL + out_offsets, residual.to(RESIDUAL.dtype.element_ty), mask=store_mask)
    tl.store(OUT + out_offsets, out.to(OUT.dtype.element_ty), mask=store_mask)


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


def layernorm_modulate_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6):
    """Checks, allocates and launches; see layernorm_modulate."""
    _check_layernorm_inputs("layernorm_modulate", x, shift=shift, scale=scale)
    check_runnable(x.device, "layernorm_modulate")
    batch, tokens, channels = x.shape
    out = new_output(batch, tokens, channels, dtype=x.dtype, device=x.device)
    n_rows = batch * tokens

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_ROWS"]),)

    with device_guard(x):
        _layernorm_modulate_fwd_kernel[grid](
            x, shift, scale, out, x.stride(0), x.stride(1), shift.stride(0), scale.stride(0),
            tokens, n_rows, channels, eps, BLOCK_C=triton.next_power_of_2(channels),
        )  # fmt: skip
    return out


@torch.library.custom_op("flux_kernels::layernorm_modulate", mutates_args=())
def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm(x, no affine, fp32 statistics) * (1 + scale[:, None]) + shift[:, None], in x's dtype.
    x: [B, L, C]; shift, scale: [B, C] (views of the adaLN embedding chunks are fine)."""
    return layernorm_modulate_fwd(x, shift, scale, eps)


@layernorm_modulate.register_fake
def _layernorm_modulate_fake(x, shift, scale, eps=1e-6):
    _check_layernorm_inputs("layernorm_modulate", x, shift=shift, scale=scale)
    return x.new_empty(x.shape)


def gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps: float = 1e-6):
    """Checks, allocates and launches; see gated_residual_layernorm_modulate."""
    op = "gated_residual_layernorm_modulate"
    _check_layernorm_inputs(op, x, gate=gate, shift=shift, scale=scale)
    _check_activation(op, "y", y, 3, "[B, L, C]")
    if y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError(f"{op}: y is {tuple(y.shape)} {y.dtype} but x is {tuple(x.shape)} {x.dtype}; they must match")
    _check_floating(op, "y", y, x.device)
    check_runnable(x.device, op)
    batch, tokens, channels = x.shape
    residual = new_output(batch, tokens, channels, dtype=x.dtype, device=x.device)
    out = new_output(batch, tokens, channels, dtype=x.dtype, device=x.device)
    n_rows = batch * tokens

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_ROWS"]),)

    with device_guard(x):
        _gated_residual_layernorm_modulate_fwd_kernel[grid](
            x, y, gate, shift, scale, residual, out,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), gate.stride(0), shift.stride(0), scale.stride(0),
            tokens, n_rows, channels, eps, BLOCK_C=triton.next_power_of_2(channels),
        )  # fmt: skip
    return residual, out


@torch.library.custom_op("flux_kernels::gated_residual_layernorm_modulate", mutates_args=())
def gated_residual_layernorm_modulate(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual = x + gate[:, None] * y; normed = layernorm_modulate(residual, shift, scale). One pass.
    x, y: [B, L, C] (same dtype); gate, shift, scale: [B, C] -> (residual, normed), both [B, L, C] in x's dtype."""
    return gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps)


@gated_residual_layernorm_modulate.register_fake
def _gated_residual_layernorm_modulate_fake(x, y, gate, shift, scale, eps=1e-6):
    _check_layernorm_inputs("gated_residual_layernorm_modulate", x, gate=gate, shift=shift, scale=scale)
    return x.new_empty(x.shape), x.new_empty(x.shape)


__all__ = [
    "gated_residual_layernorm_modulate",
    "gated_residual_layernorm_modulate_fwd",
    "gated_residual_layernorm_modulate_ref",
    "layernorm_modulate",
    "layernorm_modulate_fwd",
    "layernorm_modulate_ref",
    "qk_norm_rope",
    "qk_norm_rope_fwd",
    "qk_norm_rope_ref",
]
