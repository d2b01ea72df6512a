"""The quantised attention cores' input contract (flux_kernels.fp8_attention's Triton kernel and
flux_kernels.fp8_attention_gluon's Gluon one take the same inputs): int8 Q and K with per-(token, head) scales, e4m3
V^T with per-(head, channel) scales, as quantize_qk / quantize_v make them, checked with the fix in each message.
A module of its own so that both cores import it and neither imports the other's module back.
"""

from __future__ import annotations

import torch

from flux_kernels.fp8 import FP8_DTYPE

HEAD_DIMS = (64, 128)
LOG2E = 1.4426950408889634


def check_quantized(q8, q_scale, k8, k_scale, vt8, v_scale, out_dtype) -> None:
    def fail(message: str):
        raise ValueError(f"fp8_attention_quantized: {message}")

    if q8.dim() != 4 or k8.dim() != 4 or vt8.dim() != 4:
        fail(f"q8 {tuple(q8.shape)}, k8 {tuple(k8.shape)}, vt8 {tuple(vt8.shape)} must be 4-D ([B, H, L, D], V^T "
             "[B, H, D, L]); make them with quantize_qk / quantize_v")  # fmt: skip
    batch, heads, q_len, head_dim = q8.shape
    key_len = k8.shape[2]
    if head_dim not in HEAD_DIMS:
        fail(f"head_dim {head_dim} is not supported; allowed: {HEAD_DIMS} (use flash_attention for other sizes)")
    if k8.shape != (batch, heads, key_len, head_dim) or vt8.shape != (batch, heads, head_dim, key_len):
        fail(f"shapes do not fit: q8 {tuple(q8.shape)}, k8 {tuple(k8.shape)}, vt8 {tuple(vt8.shape)} (V^T must be "
             "[B, H, D, Lk])")  # fmt: skip
    if q8.dtype != torch.int8 or k8.dtype != torch.int8 or vt8.dtype != FP8_DTYPE:
        fail(f"dtypes q8 {q8.dtype}, k8 {k8.dtype}, vt8 {vt8.dtype}; expected int8, int8, {FP8_DTYPE}")
    for name, s, last in (("q_scale", q_scale, q_len), ("k_scale", k_scale, key_len), ("v_scale", v_scale, head_dim)):
        if s.shape != (batch, heads, last) or s.dtype != torch.float32 or s.stride(-1) != 1:
            fail(f"{name} has shape {tuple(s.shape)} {s.dtype} stride {s.stride()}; expected fp32 "
                 f"{(batch, heads, last)} with stride(-1) == 1")  # fmt: skip
    for name, x in (("q8", q8), ("k8", k8), ("vt8", vt8)):
        if x.stride(-1) != 1 or x.data_ptr() % 16 or any(st % 16 for st in x.stride()[:-1]):
            fail(f"{name} strides {x.stride()} (base {x.data_ptr() % 16} mod 16): tensor descriptors need a 16-byte "
                 "aligned base and 16-byte multiple strides; make it with quantize_qk / quantize_v")  # fmt: skip
    if min(batch, heads, q_len, key_len) < 1 or batch * heads > 65535:
        fail(f"B={batch} H={heads} Lq={q_len} Lk={key_len}: each must be >= 1 and B * H <= 65535")
    if out_dtype not in (torch.bfloat16, torch.float16):
        fail(f"out_dtype {out_dtype}; allowed: torch.bfloat16, torch.float16")


__all__ = ["HEAD_DIMS", "LOG2E", "check_quantized"]
