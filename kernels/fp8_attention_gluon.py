"""The quantised attention core of flux_kernels.fp8_attention (int8 Q K^T, e4m3 P V, fp32 softmax, the same inputs,
scales and arithmetic per score) written in Gluon, Triton's lower-level dialect, for Hopper: with explicit
asynchronous warpgroup MMAs, so that one key block's softmax runs while the tensor cores run the previous block's
P V (FA3's intra-warpgroup overlap). The Triton kernel cannot express this: Triton 3.6 waits for every outstanding
MMA at once (flux_kernels.flash_attention says what was tried), so its softmax and its MMAs take turns.

Per iteration j of one program (BLOCK_M query rows; a warp per 16 of them, one warpgroup for 64):
    issue S_j = Q K_j^T                      (tensor cores)
    issue O += P_{j-1} V_{j-1}               (tensor cores, after S_j)
    wait for S_j; softmax of S_j -> P_j      (ALU / exp2 units, beside P_{j-1} V_{j-1})
    wait for O; O *= exp2(m_{j-1} - m_j)     (the online softmax's rescale)
    prefetch K / V of block j - 1 + STAGES into the slot P_{j-1} V_{j-1} freed (TMA)
O holds the blocks before j - 1 scaled to the running max m_{j-1} at the start of iteration j, so the rescale
after the wait is the usual one. Keys past Lk (the last block's padding, zeros from TMA) get -inf scores.
Sm 9.x only (wgmma, TMA); no interpreter: the CPU tests compile it for sm_90 ahead of time
(tests/kernels/sm90_compile.py), the GPU tests run it against fp8_attention_ref.

Status (H200, 2026-11-30, benchmarks/NOTES.md 07:38-07:54; CUDA-graph device time, B=1, H=24, D=128): correct (its
GPU tests, the same accuracy as the Triton kernel on FLUX-like activations), but not faster, so no preset uses it
(FLUX_KERNELS_FP8_ATTENTION_CORE=gluon selects it for A/B runs). TFLOP/s at L = 1536 / 4608 / 8704 / 16896:
64 x 128 tiles, 3 stages: 399 / 554 / 593 / 596; 64 x 64, 4 stages (168 registers, 3 programs an SM): 407 / 544 /
583 / 606; the Triton kernel in the same runs: 405 / 588 / 633 / 668; cuDNN's bf16: 459 / 587 / 602 / 623. With two
or three programs an SM, the Triton kernel's softmax already overlaps another program's MMAs; the overlap inside one
warpgroup adds nothing measurable on top, and this kernel pays more per block (255 registers at 64 x 128). Next, if
this road is taken again: two consumer warpgroups that take turns (FA3's ping-pong, named barriers) with a producer
warp for the loads (gl.warp_specialize), and a profile (ncu) before guessing further.
"""

from __future__ import annotations

import math

import torch
import triton

from flux_kernels import device_guard, new_output
from flux_kernels.flash_attention import ensure_scratch_allocator
from flux_kernels.fp8_attention_inputs import LOG2E, check_quantized

try:  # Gluon is experimental: present in Triton 3.6 and 3.7, its API may move
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
except ImportError:  # pragma: no cover - a Triton without Gluon: the Triton kernel serves
    gluon = None

GLUON = gluon is not None


if GLUON:
    LOG2_E4M3_MAX = gl.constexpr(8.807354922057604)  # log2(448): P * 448 <= 448, the e4m3 range used to its top

    @gluon.jit
    def _softmax_block(s_int, ks, bias, row_scale, m_i, l_i):
        # The Triton kernel's arithmetic (flux_kernels.fp8_attention._softmax_pv): S in fp32 without I2F (the int32
        # plus 1.5 * 2^23 read as fp32 is 1.5 * 2^23 + S exactly), S * ks = that * ks + bias with bias =
        # -1.5 * 2^23 * ks (-inf for keys past Lk: no per-score mask), P scaled by 448 through the exp2's offset.
        s = (s_int + 0x4B400000).to(gl.float32, bitcast=True) * ks[None, :] + bias[None, :]
        m_new = gl.maximum(m_i, gl.max(s, 1) * row_scale)
        p = gl.exp2(s * row_scale[:, None] - (m_new - LOG2_E4M3_MAX)[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, m_new, l_i, alpha

    @gluon.jit
    def _key_scales(k_scales, start_n, Lk, BLOCK_N: gl.constexpr, col_layout: gl.constexpr):
        # a block's K scales and score offsets, one coalesced load (a scale a thread) spread to the MMA layout's
        # columns (loading in that layout directly made 32 scalar loads a thread a block)
        offs = start_n + gl.arange(0, BLOCK_N, layout=gl.BlockedLayout([1], [32], [gl.num_warps()], [0]))
        ks = gl.load(k_scales + offs, mask=offs < Lk, other=0.0)
        bias = gl.where(offs < Lk, ks * -12582912.0, float("-inf"))
        return gl.convert_layout(ks, col_layout), gl.convert_layout(bias, col_layout)

    @gluon.jit
    def _iteration(j, q_smem, k_smem, v_smem, bars, desc_k, desc_v, k_scales, s_zero, p16, acc, m_i, l_i,
                   row_scale, n_blocks, Lk, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, col_s: gl.constexpr,
                   row_o: gl.constexpr, p_layout: gl.constexpr):  # fmt: skip
        # S_j and P_{j-1} V_{j-1} issued back to back; S_j's softmax while the second runs. P crosses the loop's
        # back edge as fp16 (pairs packed in 32-bit registers) and becomes e4m3 in the MMA's operand layout here,
        # where the MMA takes it: carried as e4m3 it was unpacked to a byte a register and packed again (~110
        # instructions a thread a block, 2026-11-30)
        slot = j % STAGES
        mbarrier.wait(bars.index(slot), (j // STAGES) & 1)
        s_tok = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        p8 = gl.convert_layout(p16.to(gl.float8e4nv), p_layout)
        o_tok = warpgroup_mma(p8, v_smem.index((j - 1) % STAGES).permute((1, 0)), acc, is_async=True)
        ks, bias = _key_scales(k_scales, j * BLOCK_N, Lk, BLOCK_N, col_s)
        s_int = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))  # S_j (issued first) is done
        p, m_i, l_i, alpha = _softmax_block(s_int, ks, bias, row_scale, m_i, l_i)
        p16 = p.to(gl.float16)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok,))
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        if j - 1 + STAGES < n_blocks:  # the slot P_{j-1} V_{j-1} read is free again
            _load_block(desc_k, desc_v, k_smem, v_smem, bars, j - 1 + STAGES, BLOCK_N, STAGES)
        return p16, acc, m_i, l_i

    @gluon.jit
    def _load_block(desc_k, desc_v, k_smem, v_smem, bars, block, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        slot = block % STAGES
        bar = bars.index(slot)
        mbarrier.expect(bar, desc_k.block_type.nbytes + desc_v.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_k, [block * BLOCK_N, 0], bar, k_smem.index(slot))
        tma.async_copy_global_to_shared(desc_v, [0, block * BLOCK_N], bar, v_smem.index(slot))

    @gluon.jit
    def _fp8_attention_gluon_kernel(
        Q, QS, K, KS, VT, VS, Out, qk_scale,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vd,
        stride_qsb, stride_qsh, stride_ksb, stride_ksh, stride_vsb, stride_vsh, stride_ob, stride_oh, stride_om,
        H, Lq, Lk,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    ):  # fmt: skip
        start_m = gl.program_id(0)
        off_bh = gl.program_id(1)
        off_b = (off_bh // H).to(gl.int64)
        off_h = (off_bh % H).to(gl.int64)

        # S [BLOCK_M, BLOCK_N] (int8 MMA, k = 32) and O [BLOCK_M, HEAD_DIM] (e4m3 MMA, k = 32), a warp per 16 rows
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[BLOCK_M // 16, 1],
                                                           instr_shape=[16, BLOCK_N, 32])  # fmt: skip
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[BLOCK_M // 16, 1],
                                                           instr_shape=[16, HEAD_DIM, 32])  # fmt: skip
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
        qk_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], gl.int8)
        q_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], gl.int8)
        v_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HEAD_DIM, BLOCK_N], gl.float8e4nv)

        desc_q = tma.make_tensor_descriptor(Q + off_b * stride_qb + off_h * stride_qh, shape=[Lq, HEAD_DIM],
                                            strides=[stride_qm, 1], block_shape=[BLOCK_M, HEAD_DIM],
                                            layout=q_smem_layout)  # fmt: skip
        desc_k = tma.make_tensor_descriptor(K + off_b * stride_kb + off_h * stride_kh, shape=[Lk, HEAD_DIM],
                                            strides=[stride_kn, 1], block_shape=[BLOCK_N, HEAD_DIM],
                                            layout=qk_smem_layout)  # fmt: skip
        desc_v = tma.make_tensor_descriptor(VT + off_b * stride_vb + off_h * stride_vh, shape=[HEAD_DIM, Lk],
                                            strides=[stride_vd, 1], block_shape=[HEAD_DIM, BLOCK_N],
                                            layout=v_smem_layout)  # fmt: skip

        q_smem = gl.allocate_shared_memory(gl.int8, [BLOCK_M, HEAD_DIM], q_smem_layout)
        k_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, HEAD_DIM], qk_smem_layout)
        v_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, HEAD_DIM, BLOCK_N], v_smem_layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)

        n_blocks = gl.cdiv(Lk, BLOCK_N)
        mbarrier.expect(q_bar, desc_q.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_q, [start_m * BLOCK_M, 0], q_bar, q_smem)
        for i in gl.static_range(STAGES):
            if i < n_blocks:
                _load_block(desc_k, desc_v, k_smem, v_smem, bars, i, BLOCK_N, STAGES)

        offs_m = start_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_s)
        q_scale = gl.load(QS + off_b * stride_qsb + off_h * stride_qsh + offs_m, mask=offs_m < Lq, other=1.0)
        row_scale = q_scale * qk_scale  # softmax scale * log2(e) * Q's scale: scores in log2 units
        k_scales = KS + off_b * stride_ksb + off_h * stride_ksh
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, s_layout)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([BLOCK_M], gl.float32, row_s)
        mbarrier.wait(q_bar, 0)

        mbarrier.wait(bars.index(0), 0)  # block 0: its scores and softmax, nothing to overlap with yet
        s_tok = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        ks, bias = _key_scales(k_scales, 0, Lk, BLOCK_N, col_s)
        s_int = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))
        p, m_i, l_i, alpha = _softmax_block(s_int, ks, bias, row_scale, m_i, l_i)
        p16 = p.to(gl.float16)
        for j in range(1, n_blocks):
            p16, acc, m_i, l_i = _iteration(j, q_smem, k_smem, v_smem, bars, desc_k, desc_v, k_scales, s_zero, p16,
                                            acc, m_i, l_i, row_scale, n_blocks, Lk, BLOCK_N, STAGES, col_s, row_o,
                                            p_layout)  # fmt: skip
        p8 = gl.convert_layout(p16.to(gl.float8e4nv), p_layout)
        o_tok = warpgroup_mma(p8, v_smem.index((n_blocks - 1) % STAGES).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok,))
        mbarrier.invalidate(q_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        offs_d = gl.arange(0, HEAD_DIM, layout=col_o)
        v_scale = gl.load(VS + off_b * stride_vsb + off_h * stride_vsh + offs_d)
        acc = acc / gl.convert_layout(l_i, row_o)[:, None] * v_scale[None, :]
        rows = start_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_o)
        out = Out + off_b * stride_ob + off_h * stride_oh + rows[:, None].to(gl.int64) * stride_om + offs_d[None, :]
        gl.store(out, acc.to(Out.dtype.element_ty), mask=rows[:, None] < Lq)


def fp8_attention_gluon_fwd(q8, q_scale, k8, k_scale, vt8, v_scale, softmax_scale=None, out_dtype=torch.bfloat16,
                            *, block_m: int = 64, block_n: int = 128, stages: int = 3):  # fmt: skip
    """flux_kernels.fp8_attention.fp8_attention_quantized_fwd's contract (the same inputs, made by quantize_qk /
    quantize_v, and the same output layout) through the Gluon kernel. CUDA sm 9.x only."""
    if not GLUON:
        raise RuntimeError(f"fp8_attention_gluon: this Triton ({triton.__version__}) has no Gluon; use the Triton "
                           "kernel, flux_kernels.fp8_attention.fp8_attention_quantized_fwd")  # fmt: skip
    check_quantized(q8, q_scale, k8, k_scale, vt8, v_scale, out_dtype)
    if q8.shape[-1] != 128:
        raise ValueError(f"fp8_attention_gluon: head_dim {q8.shape[-1]}; this kernel is built for 128")
    if block_m not in (64, 128) or block_n not in (64, 128) or stages not in (2, 3, 4):
        raise ValueError(f"fp8_attention_gluon: tile {block_m} x {block_n} with {stages} stages; allowed: block_m and "
                         "block_n 64 or 128 (a warpgroup takes 64 rows), stages 2-4")  # fmt: skip
    if softmax_scale is not None and not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"fp8_attention_gluon: softmax_scale {softmax_scale} must be a finite number > 0 (or None)")
    if not q8.is_cuda or torch.cuda.get_device_capability(q8.device)[0] != 9:
        raise RuntimeError(f"fp8_attention_gluon: needs a Hopper GPU (sm 9.x); got {q8.device}")
    batch, heads, q_len, head_dim = q8.shape
    key_len = k8.shape[2]
    qk_scale = (head_dim**-0.5 if softmax_scale is None else float(softmax_scale)) * LOG2E
    out = new_output(batch, q_len, heads, head_dim, dtype=out_dtype, device=q8.device).transpose(1, 2)
    grid = (triton.cdiv(q_len, block_m), batch * heads)
    with device_guard(q8):
        ensure_scratch_allocator()
        _fp8_attention_gluon_kernel[grid](
            q8, q_scale, k8, k_scale, vt8, v_scale, out, qk_scale,
            *q8.stride()[:3], *k8.stride()[:3], *vt8.stride()[:3],
            *q_scale.stride()[:2], *k_scale.stride()[:2], *v_scale.stride()[:2],
            out.stride(0), out.stride(1), out.stride(2), heads, q_len, key_len,
            HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, num_warps=block_m // 16,
        )  # fmt: skip
    return out


__all__ = ["GLUON", "fp8_attention_gluon_fwd"]
