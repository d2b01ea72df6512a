"""Our kernels in the FLUX VAE (`VaeConfig(kernels=True)`): its middle-block attention as two bf16 GEMMs around a
softmax, its GroupNorms with their statistics split over the whole GPU (flux_kernels.group_norm), its ResnetBlock2Ds
with the convolutions' biases and the SiLUs folded into the passes around them, and its nearest 2x upsampling.

Attention. The VAE attends once in the middle block of its decoder (and of its encoder): one head of 512 channels
over every latent pixel, 16,384 tokens at 1024^2 and 65,536 at 2048^2 (8.8 of the 2048^2 decoder's 48.5 TFLOP). No
flash or cuDNN kernel takes a head of 512 channels (they stop at 256), so SDPA runs the memory-efficient kernel's
generic path: 63-68 ms of a 2048^2 decode on an H200 (~125 TFLOP/s), a third of the compiled decode's 207 ms.
cuBLAS's GEMMs with PyTorch's softmax between them run it at ~350 TFLOP/s (24.7 ms), 4096 queries at a time, so that
the scores need 2 x 4096 x L x 2 bytes (1 GiB at 2048^2, while the decoder's tensors are still small: not its
peak). The scores leave the GEMM in bf16 (scaled in its fp32 epilogue) where the fused kernel keeps them in fp32,
as PyTorch's math SDPA and diffusers' classic AttnProcessor do; the softmax runs in fp32 and its probabilities are
rounded to bf16 (as the fused kernels round them): max |diff| 5e-4 to 1e-3 against SDPA on unit-variance inputs.
Only diffusers' own `AttnProcessor2_0` is replaced (a processor someone else set is left as it is), and only for
self-attention without a mask. Under torch.compile (the compiled VAE) the attention is one custom op,
`flux_engine::vae_chunked_attention`: the loop over query chunks stays out of the graph, which keeps one graph for
every size.

GroupNorm. PyTorch's CUDA GroupNorm reduces each group in one thread block: 32 blocks for a batch of one, 186 of the
eager 2048^2 decode's 397 ms (46 of 87 at 1024^2; benchmarks/NOTES.md 2026-11-30 21:50,
`results/profile-vae-h200-20261130-2152.json`). Eagerly each GroupNorm's forward runs flux_kernels.group_norm on a
CUDA tensor (F.group_norm elsewhere, and under torch.compile, where inductor fuses it with its neighbours).

Layout. The decoder's and encoder's weights are made channels_last (CHANNELS_LAST): cuDNN's convolutions then read
and write NHWC without the transposes it adds around each NCHW one, and flux_kernels.group_norm reads NHWC as it is
(PyTorch's GroupNorm copied it back to NCHW: why eager channels_last alone was 1.6x slower on 2026-11-26). It gains
little by itself: 39.8 -> 37.1 ms at 1024^2, 138.2 -> 137.9 at 2048^2 (PyTorch's NHWC nearest upsampling was
slower and the convolutions' bias adds non-vectorised passes: both mended below). The decoded image comes out
NHWC; the undo makes the weights contiguous again.

ResnetBlock2D. PyTorch's cuDNN convolution adds its bias in a pass of its own (non-vectorised on channels_last
images: 23.9 ms of the 2048^2 decode's 137.9, 35 calls), then diffusers runs SiLU after each GroupNorm (7.6 ms), the
residual sum and a division by output_scale_factor (4.1 + 2.8 ms). `_resnet_forward` runs each block's convolutions
without their biases: the first one's is added where the GroupNorm after it reads (`input_bias`), the second one's
(and the 1x1 shortcut's) where the residual sum reads (flux_kernels.residual_add), and the SiLUs run where the
GroupNorms write: 7 passes over the image where diffusers makes 11. Blocks it does not cover (a time embedding,
dropout while training, other modules swapped in, torch.compile) run diffusers' forward.

Upsampling. PyTorch's nearest 2x of NHWC images took 11.8 ms for the decoder's three (~1.1 ms of traffic at the
card's bandwidth); flux_kernels.upsample_nearest copies rows of channels. Upsample2D's other paths run diffusers'.

Together, eager decode on an H200 (NOTES 2026-12-01 00:58, `results/profile-vae-eager-h200-20261201-0059.json`):
86.6 -> 28.0 ms at 1024^2, 396.4 -> 103.7 ms at 2048^2, PSNR 47.0 dB against diffusers' decode (random weights: a
floor check); before the ResnetBlock2D and upsampling fusions 37.1 / 137.9 ms, and the compiled VAE
(engine.vae_compile) 46.3 / 209.3 ms, with the attention and GroupNorm kernels 43.4 / 158.4 (2026-11-30 22:22).

On for the fastest presets, whose fp8 transformer sets their tolerance against diffusers; off everywhere else.
`apply_vae_kernels` returns the undo, which puts diffusers' processors and forwards back.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn

from flux_kernels.group_norm import group_norm
from flux_kernels.residual_add import residual_add
from flux_kernels.upsample_nearest import upsample_nearest2x

from .config import VaeConfig

CHANNELS_LAST = True
CHUNK = 4096  # queries a GEMM: 4096 / 8192 / 16384 ran 25.3 / 24.9 / 24.7 ms at 65,536 tokens (H200)


def chunked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, chunk: int = CHUNK):
    """softmax(q k^T / sqrt(D)) v for q [B, H, Lq, D], k, v [B, H, Lk, D]: per `chunk` queries, the scores by one
    batched GEMM (scaled in its epilogue), the softmax, then the GEMM with v -> [B, H, Lq, D] (contiguous)."""
    batch, heads, q_len, head_dim = query.shape
    q = query.reshape(batch * heads, q_len, head_dim)
    k_t = key.reshape(batch * heads, key.shape[2], head_dim).transpose(1, 2)
    v = value.reshape(batch * heads, key.shape[2], head_dim)
    out = query.new_empty(batch * heads, q_len, head_dim)
    scores = query.new_empty(batch * heads, min(chunk, q_len), key.shape[2])
    for start in range(0, q_len, chunk):
        rows = slice(start, min(start + chunk, q_len))
        part = scores[:, : rows.stop - rows.start]
        torch.baddbmm(part, q[:, rows], k_t, beta=0.0, alpha=head_dim**-0.5, out=part)
        torch.bmm(torch.softmax(part, dim=-1), v, out=out[:, rows])
    return out.view(batch, heads, q_len, head_dim)


@torch.library.custom_op("flux_engine::vae_chunked_attention", mutates_args=())
def _chunked_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return chunked_attention(query, key, value)


@_chunked_attention_op.register_fake
def _chunked_attention_fake(query, key, value):
    return query.new_empty(query.shape)


class ChunkedAttnProcessor:
    """diffusers' AttnProcessor2_0 with `chunked_attention` in place of F.scaled_dot_product_attention; what it
    does not cover (a mask, cross-attention, q/k norms, extra arguments) goes to the processor it replaced."""

    def __init__(self, original):
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):  # fmt: skip
        if (encoder_hidden_states is not None or attention_mask is not None or attn.norm_q is not None
                or attn.norm_k is not None or args or kwargs):  # fmt: skip
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if torch.compiler.is_compiling():
            hidden_states = _chunked_attention_op(query, key, value)
        else:
            hidden_states = chunked_attention(query, key, value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # the projection, then dropout
        if spatial:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _group_norm_forward(self: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def _fusable_resnet(block, input_tensor, temb, args, kwargs) -> bool:
    """Whether `_resnet_forward` computes what diffusers' ResnetBlock2D.forward would: the VAE's blocks (no time
    embedding, no up/down sampling, SiLU, GroupNorms, plain convolutions), in eval or with no dropout, eagerly."""
    return (temb is None and not args and not kwargs and not torch.compiler.is_compiling()
            and block.time_emb_proj is None and block.upsample is None and block.downsample is None
            and block.time_embedding_norm != "scale_shift" and type(block.nonlinearity) is nn.SiLU
            and type(block.norm1) is nn.GroupNorm and type(block.norm2) is nn.GroupNorm
            and type(block.conv1) is nn.Conv2d and type(block.conv2) is nn.Conv2d
            and (block.conv_shortcut is None or type(block.conv_shortcut) is nn.Conv2d)
            and (not block.training or block.dropout.p == 0) and input_tensor.dim() == 4)  # fmt: skip


def _resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs):
    """diffusers' ResnetBlock2D.forward with the convolutions' biases where the next pass reads anyway: the first
    convolution's into the GroupNorm after it, the second's (and the shortcut's) into the residual sum; the SiLUs
    inside the GroupNorms. 7 passes over the image where diffusers makes 11 (eager, channels_last: each bias add
    is a non-vectorised pass)."""
    if not _fusable_resnet(self, input_tensor, temb, args, kwargs):
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    norm1, norm2, conv1, conv2 = self.norm1, self.norm2, self.conv1, self.conv2
    hidden = group_norm(input_tensor, norm1.num_groups, norm1.weight, norm1.bias, norm1.eps, silu=True)
    hidden = conv1._conv_forward(hidden, conv1.weight, None)
    hidden = group_norm(hidden, norm2.num_groups, norm2.weight, norm2.bias, norm2.eps, input_bias=conv1.bias,
                        silu=True)  # fmt: skip
    hidden = conv2._conv_forward(self.dropout(hidden), conv2.weight, None)
    bias = conv2.bias.float() if conv2.bias is not None else hidden.new_zeros(hidden.shape[1], dtype=torch.float32)
    shortcut = input_tensor
    if self.conv_shortcut is not None:
        shortcut = self.conv_shortcut._conv_forward(input_tensor, self.conv_shortcut.weight, None)
        if self.conv_shortcut.bias is not None:
            bias = bias + self.conv_shortcut.bias.float()
    return residual_add(hidden, shortcut, bias, self.output_scale_factor, out=hidden)


def _upsample_forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
    """diffusers' Upsample2D.forward with flux_kernels.upsample_nearest for the nearest 2x of channels_last
    images (PyTorch's NHWC kernel is ~10x slower than the bandwidth); the rest goes to diffusers' forward."""
    if (output_size is not None or args or kwargs or not self.interpolate or self.norm is not None
            or self.use_conv_transpose or torch.compiler.is_compiling()):  # fmt: skip
        return type(self).forward(self, hidden_states, output_size, *args, **kwargs)
    hidden_states = upsample_nearest2x(hidden_states)
    if self.use_conv:
        hidden_states = (self.conv if self.name == "conv" else self.Conv2d_0)(hidden_states)
    return hidden_states


def apply_vae_kernels(pipe, config: VaeConfig, channels_last: bool = CHANNELS_LAST) -> Callable[[], None] | None:
    """With config.kernels, every attention of `pipe.vae` that runs diffusers' AttnProcessor2_0 runs
    ChunkedAttnProcessor instead, every GroupNorm runs flux_kernels.group_norm, every ResnetBlock2D and Upsample2D
    the fused forwards above, and (channels_last) the decoder's and encoder's weights are channels_last; returns the
    undo (None when nothing was changed)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    vae = getattr(pipe, "vae", None)
    if not config.kernels or vae is None:
        return None
    replaced = [(module, module.processor) for module in vae.modules()
                if isinstance(module, Attention) and type(module.processor) is AttnProcessor2_0]  # fmt: skip
    for module, processor in replaced:
        module.set_processor(ChunkedAttnProcessor(processor))
    forwards = {nn.GroupNorm: _group_norm_forward, ResnetBlock2D: _resnet_forward, Upsample2D: _upsample_forward}
    patched = [module for module in vae.modules() if type(module) in forwards and "forward" not in module.__dict__]
    for module in patched:
        module.forward = types.MethodType(forwards[type(module)], module)
    parts = [getattr(vae, name) for name in ("decoder", "encoder") if channels_last and hasattr(vae, name)]
    for part in parts:
        part.to(memory_format=torch.channels_last)

    def undo() -> None:
        for module, processor in replaced:
            if isinstance(module.processor, ChunkedAttnProcessor):
                module.set_processor(processor)
        for module in patched:
            forward = module.__dict__.get("forward")
            if getattr(forward, "__func__", None) in forwards.values():
                del module.forward
        for part in parts:
            part.to(memory_format=torch.contiguous_format)

    return undo if replaced or patched or parts else None


__all__ = ["CHANNELS_LAST", "CHUNK", "ChunkedAttnProcessor", "apply_vae_kernels", "chunked_attention"]
