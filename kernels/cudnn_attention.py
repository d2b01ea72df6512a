"""FP8 attention through cuDNN's fused SDPA (the `sdpa_fp8` operation of NVIDIA's cudnn-frontend graph API).

Not a Triton kernel: cuDNN's own Hopper kernel, built once per shape through the `nvidia-cudnn-frontend` Python
package (an optional dependency: `pip install "nvidia-cudnn-frontend==1.16.0"`, or the `cudnn` extra) over the
cuDNN library PyTorch already loads. Why here: our Triton fp8 core is bound by its softmax's issue slots without
warp specialisation (589-663 TFLOP/s on an H200, benchmarks/NOTES.md 2026-11-30 01:37 and 07:38), and cuDNN's
kernel overlaps the softmax with the MMAs as FA3 does.

Number formats (cuDNN's fp8 SDPA takes one fp32 scale per tensor):
- Q and K: e4m3, one scale per tensor: amax / 448 (quantize_tensor), or in the engine a static bound / 448 where the
  bound follows from the RMSNorm weights (qk_bound; written so by the QK-norm kernel, qk_norm_rope_e4m3_pairs: no
  pass over q and k). e4m3 is a float: its relative precision (2^-4) does not depend on the scale as long as the
  values stay within its normal range (2^-6 .. 448 times the scale), which post-RMSNorm q and k do.
- V: e4m3 with one scale per (head, channel) over all tokens (as flux_kernels.fp8_attention): V is divided by its
  channel scales before the cast, cuDNN runs with descale_v = 1 and the output's channels are multiplied back
  (O = P V is linear in each channel of V). `v_scaling="tensor"` takes one scale for all of V instead (no multiply).
- P: cuDNN quantises the softmax probabilities to e4m3 with scale_s = 448 (P <= 1).
- O: e4m3 with scale_o = 1 (cuDNN on Hopper writes fp8 only; bf16 output needs Blackwell, cudnn-frontend 1.16-1.32),
  [B, Lq, H, D] memory returned as a [B, H, Lq, D] view (the block's next layout). O is a convex combination of
  V's rows, so |O| <= max|V8| <= 448 always fits; `cudnn_fp8_attention` multiplies it back to bf16 with V's scales.
Limits: forward only, no mask, sm_90+ with cuDNN >= 9.14 (cuDNN's own requirement for this graph).
"""

from __future__ import annotations

import functools
import threading

import torch

from flux_kernels.fp8 import E4M3_MAX, MIN_SCALE
from flux_kernels.fp8 import FP8_DTYPE as FP8
from flux_kernels.fp8_attention import v_channel_scale

FRONTEND_PIN = "nvidia-cudnn-frontend==1.16.0"
MIN_CUDNN = (9, 14)

# graph tensor uids (any distinct integers)
_Q, _K, _V, _O, _DQ, _DK, _DV, _DS, _SS, _SO, _AMAX_S, _AMAX_O = range(1, 13)


class CudnnAttentionUnavailable(RuntimeError):
    """cuDNN's fp8 attention cannot run here; the message says why and what to do."""


def import_cudnn():
    """The cudnn-frontend package, or CudnnAttentionUnavailable saying how to install it."""
    try:
        import cudnn
    except ImportError as error:
        raise CudnnAttentionUnavailable(
            f"cuDNN fp8 attention needs the cudnn-frontend Python package, which is not installed ({error}); "
            f'install it with `pip install "{FRONTEND_PIN}"` or use the attention backend "triton-fp8"'
        ) from error
    return cudnn


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """None when cuDNN's fp8 attention can run on `device` (default: the current CUDA device), else why not."""
    if not torch.cuda.is_available():
        return "cuDNN fp8 attention needs a CUDA GPU; none is visible to PyTorch"
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        return f"cuDNN fp8 attention runs on CUDA tensors, got device {device}"
    return _cuda_unavailable_reason(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _cuda_unavailable_reason(index: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(index)
    if major < 9:
        return f"cuDNN fp8 attention needs compute capability >= 9.0 (Hopper), this GPU has {major}.{minor}"
    try:
        cudnn = import_cudnn()
    except CudnnAttentionUnavailable as error:
        return str(error)
    version = cudnn.backend_version()  # e.g. 91900 for 9.19.0
    found = (version // 10000, version // 100 % 100)
    if found < MIN_CUDNN:
        return (
            f"cuDNN fp8 attention needs cuDNN >= {MIN_CUDNN[0]}.{MIN_CUDNN[1]}, PyTorch loaded "
            f"{found[0]}.{found[1]}; install a PyTorch build with a newer cuDNN or use the backend 'triton-fp8'"
        )
    return None


_local = threading.local()


def cudnn_handle(device: torch.device):
    """This thread's cuDNN handle for `device` (made once)."""
    cudnn = import_cudnn()
    handles = getattr(_local, "handles", None)
    if handles is None:
        handles = _local.handles = {}
    if device.index not in handles:
        with torch.cuda.device(device):
            handles[device.index] = cudnn.create_handle()
    return handles[device.index]


@functools.cache
def _one(device: torch.device) -> torch.Tensor:
    return torch.ones(1, 1, 1, 1, dtype=torch.float32, device=device)


@functools.cache
def _constants(device: torch.device) -> dict[int, torch.Tensor]:
    """The graph's fixed scalars on `device`: descale_s, scale_s, scale_o, and two amax outputs nobody reads."""

    def scalar(value: float) -> torch.Tensor:
        return torch.full((1, 1, 1, 1), value, dtype=torch.float32, device=device)

    return {_DS: scalar(1.0 / E4M3_MAX), _SS: scalar(E4M3_MAX), _SO: scalar(1.0), _AMAX_S: scalar(0.0),
            _AMAX_O: scalar(0.0)}  # fmt: skip


def operation_graph(device: torch.device, q_shape, q_stride, k_shape, k_stride, v_stride, o_stride, softmax_scale):
    """The fp8 SDPA graph for these shapes and strides, validated, its operation graph built, no execution plan yet
    (benchmarks/kernels/bench_cudnn_plans.py times every plan cuDNN offers for it)."""
    cudnn = import_cudnn()
    handle = cudnn_handle(device)
    graph = cudnn.pygraph(
        io_data_type=cudnn.data_type.FP8_E4M3,
        intermediate_data_type=cudnn.data_type.FLOAT,
        compute_data_type=cudnn.data_type.FLOAT,
        handle=handle,
    )
    e4m3 = cudnn.data_type.FP8_E4M3
    q = graph.tensor(uid=_Q, dim=q_shape, stride=q_stride, data_type=e4m3)
    k = graph.tensor(uid=_K, dim=k_shape, stride=k_stride, data_type=e4m3)
    v = graph.tensor(uid=_V, dim=k_shape, stride=v_stride, data_type=e4m3)

    def scalar(uid):
        return graph.tensor(uid=uid, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=cudnn.data_type.FLOAT)

    o, _stats, amax_s, amax_o = graph.sdpa_fp8(
        q=q, k=k, v=v, descale_q=scalar(_DQ), descale_k=scalar(_DK), descale_v=scalar(_DV), descale_s=scalar(_DS),
        scale_s=scalar(_SS), scale_o=scalar(_SO), is_inference=True, attn_scale=softmax_scale,
        use_causal_mask=False,
    )  # fmt: skip
    o.set_uid(_O).set_output(True).set_dim(q_shape).set_stride(o_stride).set_data_type(e4m3)
    for tensor, uid in ((amax_s, _AMAX_S), (amax_o, _AMAX_O)):
        tensor.set_uid(uid).set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1))
        tensor.set_data_type(cudnn.data_type.FLOAT)
    graph.validate()
    graph.build_operation_graph()
    return graph


def variant_pack(q8, k8, v8, out, q_descale, k_descale) -> dict:
    """The graph's tensors by uid for one call: the inputs, the output and the fixed scalars."""
    return {_Q: q8, _K: k8, _V: v8, _O: out, _DQ: q_descale, _DK: k_descale, _DV: _one(q8.device),
            **_constants(q8.device)}  # fmt: skip


@functools.cache
def _graph(device: torch.device, q_shape, q_stride, k_shape, k_stride, v_stride, o_stride, softmax_scale):
    """A built cuDNN graph for these shapes and strides (cached: building costs ~10-100 ms)."""
    cudnn = import_cudnn()
    graph = operation_graph(device, q_shape, q_stride, k_shape, k_stride, v_stride, o_stride, softmax_scale)
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return graph, graph.get_workspace_size()


def check_inputs(q8, k8, v8, q_descale, k_descale) -> None:
    for name, x in (("q8", q8), ("k8", k8), ("v8", v8)):
        if x.dim() != 4 or x.dtype != FP8 or x.stride(-1) != 1 or not x.is_cuda:
            raise ValueError(
                f"cudnn_fp8_attention: {name} has shape {tuple(x.shape)}, dtype {x.dtype}, strides {x.stride()}, "
                f"device {x.device}; expected a CUDA float8_e4m3fn [B, H, L, D] tensor with stride(-1) == 1"
            )
    if k8.shape != v8.shape or q8.shape[:2] != k8.shape[:2] or q8.shape[3] != k8.shape[3]:
        raise ValueError(
            f"cudnn_fp8_attention: q8 {tuple(q8.shape)}, k8 {tuple(k8.shape)}, v8 {tuple(v8.shape)}: expected q "
            "[B, H, Lq, D] and k, v [B, H, Lk, D] with the same B, H, D"
        )
    for name, s in (("q_descale", q_descale), ("k_descale", k_descale)):
        if s.numel() != 1 or s.dtype != torch.float32 or s.device != q8.device:
            raise ValueError(
                f"cudnn_fp8_attention: {name} has shape {tuple(s.shape)}, dtype {s.dtype}, device {s.device}; "
                f"expected one float32 value on {q8.device}"
            )


def cudnn_fp8_attention_quantized(q8, k8, v8, q_descale, k_descale, softmax_scale=None) -> torch.Tensor:
    """softmax(q_descale k_descale Q8 K8^T * scale) V8 on e4m3 inputs [B, H, L, D] (any strides with
    stride(-1) == 1; q_descale, k_descale: one fp32 value each) -> e4m3 [B, H, Lq, D], a view of [B, Lq, H, D]
    memory, in V8's units: multiply by V's scale(s) for the attention output. Runs on PyTorch's current stream
    (CUDA-graph capturable)."""
    check_inputs(q8, k8, v8, q_descale, k_descale)
    reason = unavailable_reason(q8.device)
    if reason is not None:
        raise CudnnAttentionUnavailable(reason)
    batch, heads, q_len, head_dim = q8.shape
    scale = float(head_dim**-0.5 if softmax_scale is None else softmax_scale)
    out = torch.empty(batch, q_len, heads, head_dim, dtype=FP8, device=q8.device).transpose(1, 2)
    graph, workspace_size = _graph(q8.device, tuple(q8.shape), q8.stride(), tuple(k8.shape), k8.stride(),
                                   v8.stride(), out.stride(), scale)  # fmt: skip
    cudnn = import_cudnn()
    handle = cudnn_handle(q8.device)
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q8.device).cuda_stream)
    pack = variant_pack(q8, k8, v8, out, q_descale, k_descale)
    workspace = torch.empty(max(workspace_size, 1), dtype=torch.uint8, device=q8.device)
    graph.execute(pack, workspace, handle=handle)
    return out


def cudnn_fp8_attention_ref(q8, k8, v8, q_descale, k_descale, softmax_scale=None) -> torch.Tensor:
    """cudnn_fp8_attention_quantized's arithmetic in PyTorch (fp32, any device): S from the e4m3 Q, K and their
    descales, P = exp(S - rowmax) times 448 cast to e4m3 for the P V product, the row sums from P before the cast,
    O cast to e4m3 (scale_o = 1). cuDNN keeps a running max over key blocks instead of the whole row's, so its P
    codes differ in rounding, not in scale. -> e4m3 [B, H, Lq, D] (contiguous)."""
    head_dim = q8.shape[-1]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    scores = (q8.float() * q_descale.float()) @ (k8.float() * k_descale.float()).transpose(-1, -2) * scale
    p = torch.exp(scores - scores.amax(-1, keepdim=True))
    p8 = (p * E4M3_MAX).to(FP8).float() / E4M3_MAX
    out = (p8 @ v8.float()) / p.sum(-1, keepdim=True)
    return out.clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (e4m3 codes, fp32 descale [1, 1, 1, 1]) with one scale for the whole tensor: amax / 448."""
    amax = x.abs().amax().float().clamp(min=MIN_SCALE * E4M3_MAX)
    descale = amax / E4M3_MAX
    return (x.float() / descale).to(FP8), descale.reshape(1, 1, 1, 1)


def quantize_v_channels(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v [B, H, L, D] -> (e4m3 codes of v / scale, fp32 scale [B, H, 1, D]): one scale per (head, channel), as
    flux_kernels.fp8_attention scales V (v_channel_scale)."""
    scale = v_channel_scale(v).unsqueeze(2)
    return (v.float() / scale).to(FP8), scale


def quantize_bounded(x: torch.Tensor, bound: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (e4m3 codes, fp32 descale [1, 1, 1, 1]) with the scale bound / 448 for a known bound on |x| (a
    0-dim tensor; no pass over x to find its amax). Values past the bound saturate at +-448. The arithmetic of the
    QK-norm kernel's e4m3 outputs: the descale floored at the smallest normal fp32, x times its reciprocal."""
    descale = (bound.float() / E4M3_MAX).clamp(min=MIN_SCALE)
    codes = (x.float() * (1.0 / descale)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    return codes, descale.reshape(1, 1, 1, 1)


def bound_factor(head_dim: int) -> float:
    """qk_bound's factor on the largest |weight|: sqrt(D), 1% over for the rounding of the normalised values."""
    return head_dim**0.5 * 1.01


def qk_bound(head_dim: int, weight: torch.Tensor, txt_weight: torch.Tensor | None = None) -> torch.Tensor:
    """A bound on |q| (or |k|) after RMSNorm with these weights and the rotary embedding: each normalised element is
    at most sqrt(D) in size (x_c^2 <= sum x^2 = D rms^2), times the largest |weight|; a rotation keeps each pair's
    length, which the same bound holds for. -> 0-dim fp32."""
    largest = weight.detach().abs().amax().float()
    if txt_weight is not None:
        largest = torch.maximum(largest, txt_weight.detach().abs().amax().float())
    return largest * bound_factor(head_dim)


def quantize_qk_bounded(qk_fn, qkv, q_weight, k_weight, cos, sin, heads, eps, txt_qkv=None, txt_q=None,
                        txt_k=None):  # fmt: skip
    """qk_fn (qk_norm_rope or its reference: -> bf16 q, k, v [B, H, L, D]) with q and k then quantised to e4m3 with
    the static scales of `qk_bound` -> ((q8, q_descale), (k8, k_descale), v). qk_norm_rope_e4m3_pairs does the same
    in the QK-norm kernel's registers."""
    q, k, v = qk_fn(qkv, q_weight, k_weight, cos, sin, heads, eps, txt_qkv, txt_q, txt_k)
    head_dim = q.shape[-1]
    q8 = quantize_bounded(q, qk_bound(head_dim, q_weight, txt_q))
    k8 = quantize_bounded(k, qk_bound(head_dim, k_weight, txt_k))
    return q8, k8, v


@torch.library.custom_op("flux_kernels::qk_norm_rope_e4m3", mutates_args=())
def _qk_norm_rope_e4m3_op(
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
    from flux_kernels.qk_norm_rope import qk_norm_rope_fwd

    bound = bound_factor(q_weight.shape[-1])
    return qk_norm_rope_fwd(qkv, q_weight, k_weight, cos, sin, heads, eps, txt_qkv, txt_q_weight, txt_k_weight,
                            e4m3_bound=bound)  # fmt: skip


@_qk_norm_rope_e4m3_op.register_fake
def _qk_norm_rope_e4m3_fake(qkv, q_weight, k_weight, cos, sin, heads, eps=1e-6, txt_qkv=None, txt_q_weight=None,
                            txt_k_weight=None):  # fmt: skip
    tokens = qkv.shape[1] + (0 if txt_qkv is None else txt_qkv.shape[1])  # [text, image], as the kernel writes
    shape = (qkv.shape[0], heads, tokens, q_weight.shape[-1])
    descale = qkv.new_empty(1, 1, 1, 1, dtype=torch.float32)
    q8, k8 = qkv.new_empty(shape, dtype=FP8), qkv.new_empty(shape, dtype=FP8)
    return q8, descale, k8, descale.clone(), qkv.new_empty(shape)


def qk_norm_rope_e4m3_pairs(qkv, q_weight, k_weight, cos, sin, heads, eps=1e-6, txt_qkv=None, txt_q=None,
                            txt_k=None):  # fmt: skip
    """flux_kernels.qk_norm_rope with q and k written as e4m3 codes with the static scales of `qk_bound`, computed
    in the kernel from the weights (no bf16 q, k in memory) -> ((q8, q_descale), (k8, k_descale), v); reference:
    quantize_qk_bounded around qk_norm_rope_ref (within one code where a product sits on a rounding boundary)."""
    args = (qkv, q_weight, k_weight, cos, sin, heads, eps, txt_qkv, txt_q, txt_k)
    if torch.compiler.is_compiling():
        q8, q_descale, k8, k_descale, v = _qk_norm_rope_e4m3_op(*args)
    else:
        from flux_kernels.qk_norm_rope import qk_norm_rope_fwd

        q8, q_descale, k8, k_descale, v = qk_norm_rope_fwd(*args, e4m3_bound=bound_factor(q_weight.shape[-1]))
    return (q8, q_descale), (k8, k_descale), v


@torch.library.custom_op("flux_kernels::cudnn_fp8_attention", mutates_args=())
def _cudnn_fp8_attention_op(
    q8: torch.Tensor,
    k8: torch.Tensor,
    v8: torch.Tensor,
    q_descale: torch.Tensor,
    k_descale: torch.Tensor,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    return cudnn_fp8_attention_quantized(q8, k8, v8, q_descale, k_descale, softmax_scale)


@_cudnn_fp8_attention_op.register_fake
def _cudnn_fp8_attention_fake(q8, k8, v8, q_descale, k_descale, softmax_scale=None):
    batch, heads, q_len, head_dim = q8.shape
    return q8.new_empty(batch, q_len, heads, head_dim).transpose(1, 2)


def cudnn_fp8_attention_pairs(query, key, value, softmax_scale=None) -> torch.Tensor:
    """The engine's 'cudnn-fp8' core: query, key as (e4m3 codes, descale) pairs (quantize_qk_bounded), value bf16
    [B, H, Lk, D], quantised here per (head, channel) -> [B, H, Lq, D] in value's dtype, a view of [B, Lq, H, D]
    memory. The custom op `flux_kernels::cudnn_fp8_attention` under torch.compile (the quantisers around it are
    compiled with their neighbours)."""
    out8, v_scale = cudnn_fp8_attention_scaled(query, key, value, softmax_scale)
    return (out8.float() * v_scale).to(value.dtype)


def cudnn_fp8_attention_scaled(query, key, value, softmax_scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cudnn_fp8_attention_pairs before V's channel scales are applied: (e4m3 codes [B, H, Lq, D], a view of
    [B, Lq, H, D] memory; fp32 scales [B, H, 1, D]), the output being codes * scales. For a consumer that applies
    the scales as it reads (flux_kernels.gelu_fp8.gelu_concat_fp8's prefix_scale) instead of a pass of their own."""
    (q8, q_descale), (k8, k_descale) = query, key
    v8, v_scale = quantize_v_channels(value)
    return _cudnn_fp8_attention_op(q8, k8, v8, q_descale, k_descale, softmax_scale), v_scale


def cudnn_fp8_attention(q, k, v, softmax_scale=None, v_scaling: str = "channel") -> torch.Tensor:
    """Attention of bf16/fp16 q [B, H, Lq, D], k, v [B, H, Lk, D], quantised here (see the module docstring) and
    run through cuDNN's fp8 SDPA -> [B, H, Lq, D] in q's dtype, a view of [B, Lq, H, D] memory."""
    if v_scaling not in ("channel", "tensor"):
        raise ValueError(f"cudnn_fp8_attention: v_scaling {v_scaling!r}; allowed 'channel' or 'tensor'")
    q8, q_descale = quantize_tensor(q)
    k8, k_descale = quantize_tensor(k)
    v8, v_scale = quantize_v_channels(v) if v_scaling == "channel" else quantize_tensor(v)
    out8 = cudnn_fp8_attention_quantized(q8, k8, v8, q_descale, k_descale, softmax_scale)
    return (out8.float() * v_scale).to(q.dtype)


__all__ = [
    "CudnnAttentionUnavailable",
    "cudnn_fp8_attention",
    "cudnn_fp8_attention_pairs",
    "cudnn_fp8_attention_quantized",
    "cudnn_fp8_attention_scaled",
    "cudnn_fp8_attention_ref",
    "cudnn_handle",
    "import_cudnn",
    "operation_graph",
    "bound_factor",
    "qk_bound",
    "qk_norm_rope_e4m3_pairs",
    "quantize_bounded",
    "quantize_qk_bounded",
    "quantize_tensor",
    "quantize_v_channels",
    "unavailable_reason",
    "variant_pack",
]
