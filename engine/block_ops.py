"""BlockOps: the functions the engine's fused FLUX blocks (engine/attention.py) call, chosen once per pipeline from
the AttentionConfig: the QK-norm + RoPE variant and the attention core that takes its output, the norm kernels (with
e4m3 outputs for an fp8 projection after them), and the fp8 / LoRA paths of the projections after each norm."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.activations import GELU
from torch import nn

from .lora import active_lora, add_fused_lora, fp8_linear_with_lora, fp8_lora_ready


@dataclass(frozen=True)
class BlockOps:
    """The functions the fused blocks call, chosen once per pipeline from the AttentionConfig."""

    core: str  # "triton", "sdpa", "triton-fp8" or "cudnn-fp8"
    fused_norms: bool
    qk_norm_rope_fn: Callable
    layernorm_modulate_fn: Callable
    gated_residual_layernorm_modulate_fn: Callable
    flash_attention_fn: Callable | None = None
    # the kernels with e4m3 outputs for an fp8 projection after them (fused_norms only): the norms, and the MLP's
    # GELU (with the single-stream block's concatenation before proj_out)
    layernorm_modulate_fp8_fn: Callable | None = None
    gated_residual_layernorm_modulate_fp8_fn: Callable | None = None
    gelu_concat_fp8_fn: Callable | None = None
    # context parallelism (engine/parallel/): the id of the SequenceShards that attention exchanges tokens through,
    # and, under Ulysses, its (groups, slices) of heads: q, k and v are then written in the exchange's own layout
    shards_id: int | None = None
    exchange_groups: tuple[int, int] | None = None
    qk_norm_rope_grouped_fn: Callable | None = None
    # the core's output before its last scaling, as (e4m3 codes, per-channel scales), for gelu_concat_fp8 to scale as
    # it reads ('cudnn-fp8' only: flux_kernels.cudnn_attention.cudnn_fp8_attention_scaled)
    scaled_attention_fn: Callable | None = None

    @classmethod
    def build(cls, core: str, fused_norms: bool) -> BlockOps:
        from flux_kernels import layernorm_modulate as norm
        from flux_kernels import qk_norm_rope as qk

        flash = scaled = None
        if core == "triton":
            from flux_kernels.flash_attention import flash_attention as flash
        elif core == "triton-fp8":
            from flux_kernels.fp8_attention import quantized_attention as flash
        elif core == "cudnn-fp8":
            from flux_kernels.cudnn_attention import cudnn_fp8_attention_pairs as flash
            from flux_kernels.cudnn_attention import cudnn_fp8_attention_scaled as scaled
        if fused_norms:
            qk_fn = qk.qk_norm_rope_int8_pairs if core == "triton-fp8" else qk.qk_norm_rope
            fns = (qk_fn, norm.layernorm_modulate, norm.gated_residual_layernorm_modulate)
            from flux_kernels.gelu_fp8 import gelu_concat_fp8

            fp8_fns = (norm.layernorm_modulate_fp8, norm.gated_residual_layernorm_modulate_fp8, gelu_concat_fp8)
            grouped = qk.qk_norm_rope_grouped
        else:  # the same math as diffusers, in PyTorch, in the activations' dtype
            fns = (
                functools.partial(qk.qk_norm_rope_ref, upcast=False),
                functools.partial(norm.layernorm_modulate_ref, upcast=False),
                functools.partial(norm.gated_residual_layernorm_modulate_ref, upcast=False),
            )
            fp8_fns = (None, None, None)
            grouped = functools.partial(qk.qk_norm_rope_grouped_ref, upcast=False)
        if core == "cudnn-fp8":  # q and k leave as e4m3 with static scales (flux_kernels.cudnn_attention)
            from flux_kernels import cudnn_attention as ca

            fns = (ca.qk_norm_rope_e4m3_pairs if fused_norms else functools.partial(ca.quantize_qk_bounded, fns[0]),
                   *fns[1:])  # fmt: skip
        return cls(core, fused_norms, *fns, flash, *fp8_fns, qk_norm_rope_grouped_fn=grouped,
                   scaled_attention_fn=scaled if fused_norms else None)  # fmt: skip

    def qk_norm_rope(self, qkv, q_weight, k_weight, rotary, heads, eps, txt_qkv=None, txt_q=None, txt_k=None):
        """-> (q, k, v) [B, H, L, D]; under a Ulysses exchange (packed, None, None): q, k, v packed for it."""
        cos, sin = rotary
        args = (qkv, q_weight, k_weight, cos, sin, heads, eps, txt_qkv, txt_q, txt_k)
        if self.exchange_groups is not None:
            groups, slices = self.exchange_groups
            return self.qk_norm_rope_grouped_fn(*args, groups=groups, slices=slices), None, None
        return self.qk_norm_rope_fn(*args)

    def attention(self, query, key, value) -> torch.Tensor:
        """q, k, v: [B, H, L, D] -> [B, L, H*D]. For the 'triton-fp8' core after the fused QK-norm, q and k are
        (int8 codes, scales) pairs (flux_kernels.qk_norm_rope.qk_norm_rope_int8), for 'cudnn-fp8' (e4m3 codes,
        descale) pairs (flux_kernels.cudnn_attention.quantize_qk_bounded); under a Ulysses exchange, query
        is qk_norm_rope's packed q, k, v (key and value None)."""
        if self.exchange_groups is not None:  # the packed heads sent as they are (engine.parallel.exchange)
            from .parallel.exchange import unpack_heads

            back = torch.ops.flux_engine.context_parallel_grouped_attention(query, self.shards_id, self.core)
            return unpack_heads(back)  # [B, L_local, H*D]; under compile, written by the next kernel's reads
        if self.shards_id is not None:  # this rank's tokens over the whole split sequence (engine.parallel.exchange)
            return torch.ops.flux_engine.context_parallel_attention(query, key, value, self.shards_id, self.core)
        batch, heads, tokens, head_dim = value.shape  # joint attention: as many queries as keys
        if self.flash_attention_fn is not None:
            out = self.flash_attention_fn(query, key, value)  # [B, H, L, D] over [B, L, H, D] memory
        else:
            out = F.scaled_dot_product_attention(query, key, value)
        return out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)

    def attention_before_concat(self, query, key, value, linear: nn.Module, act: nn.Module):
        """attention(query, key, value) for the single-stream block's gelu_concat_linear(linear, act, ...): where
        that takes the fp8 path and the core leaves e4m3 codes with channel scales, (codes [B, L, H*D], scales
        [B, H*D]) unscaled, for gelu_concat_fp8 to scale as it reads (one pass over the attention output fewer);
        otherwise the [B, L, H*D] output."""
        if (self.scaled_attention_fn is None or self.exchange_groups is not None or self.shards_id is not None
                or not self._gelu_concat_fp8_into(linear, act)):  # fmt: skip
            return self.attention(query, key, value)
        batch, heads, tokens, head_dim = value.shape
        codes, scales = self.scaled_attention_fn(query, key, value)  # [B, H, L, D] over [B, L, H, D]; [B, H, 1, D]
        return codes.transpose(1, 2).reshape(batch, tokens, heads * head_dim), scales.reshape(batch, heads * head_dim)

    def layernorm_modulate(self, x, shift, scale, eps):
        return self.layernorm_modulate_fn(x, shift, scale, eps)

    def gated_residual_layernorm_modulate(self, x, y, gate, shift, scale, eps):
        return self.gated_residual_layernorm_modulate_fn(x, y, gate, shift, scale, eps)

    def _fp8_into(self, linear: nn.Module, fn: Callable | None) -> bool:
        # an Fp8Linear that wants pre-quantised activations (engine.quant.fp8.Fp8Linear.takes_fp8_input), after a
        # norm kernel that can make them
        return fn is not None and getattr(linear, "takes_fp8_input", False)

    def modulated_linear(self, linear: nn.Module, x, shift, scale, eps, parts: list[nn.Module] | None = None):
        """linear(layernorm_modulate(x, shift, scale)); an fp8 `linear` takes the norm kernel's e4m3 output and
        per-token scales, so the activations are not written in bf16 and read back to be quantised. parts: the
        projections fused into `linear`, whose acting LoRA adapters (engine/lora.py) are added to their columns."""
        layers = active_lora(parts) if parts else None
        if self._fp8_into(linear, self.layernorm_modulate_fp8_fn) and (layers is None or fp8_lora_ready(layers)):
            normed, normed_scale = self.layernorm_modulate_fp8_fn(x, shift, scale, eps)
            if layers is not None:
                return fp8_linear_with_lora(linear, parts, layers, normed, normed_scale, x.dtype)
            return linear(normed, normed_scale, out_dtype=x.dtype)
        normed = self.layernorm_modulate(x, shift, scale, eps)
        return linear(normed) if layers is None else add_fused_lora(linear(normed), parts, layers, normed)

    def gated_residual_modulated_linear(self, linear: nn.Module, x, y, gate, shift, scale, eps):
        """(residual, linear(normed)) of gated_residual_layernorm_modulate, fp8 as in modulated_linear."""
        if self._fp8_into(linear, self.gated_residual_layernorm_modulate_fp8_fn):
            residual, normed_fp8, normed_scale = self.gated_residual_layernorm_modulate_fp8_fn(
                x, y, gate, shift, scale, eps
            )
            return residual, linear(normed_fp8, normed_scale, out_dtype=x.dtype)
        residual, normed = self.gated_residual_layernorm_modulate(x, y, gate, shift, scale, eps)
        return residual, linear(normed)

    def modulated_feed_forward(self, ff: nn.Module, x, y, gate, shift, scale, eps):
        """(residual, ff(normed)) for a diffusers FeedForward `ff` after gated_residual_layernorm_modulate: its
        first projection (net[0].proj) is the Linear that takes the norm's output, fp8 or not; an fp8 output
        projection (net[2]) after FLUX's tanh GELU takes gelu_concat_fp8's e4m3 output (GELU and quantisation
        in one pass)."""
        first, rest = ff.net[0], list(ff.net[1:])
        if type(first) is not GELU or _hooked(ff) or _hooked(first):  # not FLUX's FeedForward, or hooked: run whole
            residual, normed = self.gated_residual_layernorm_modulate(x, y, gate, shift, scale, eps)
            return residual, ff(normed)
        residual, hidden = self.gated_residual_modulated_linear(first.proj, x, y, gate, shift, scale, eps)
        inert_dropout = len(rest) == 2 and isinstance(rest[0], nn.Dropout) and (rest[0].p == 0 or not rest[0].training)
        if inert_dropout and first.approximate == "tanh" and self._fp8_into(rest[1], self.gelu_concat_fp8_fn):
            return residual, rest[1](*self.gelu_concat_fp8_fn(None, hidden), out_dtype=hidden.dtype)
        hidden = first.gelu(hidden)
        for module in rest:
            hidden = module(hidden)
        return residual, hidden

    def _gelu_concat_fp8_into(self, linear: nn.Module, act: nn.Module) -> bool:
        tanh_gelu = isinstance(act, nn.GELU) and act.approximate == "tanh"
        return tanh_gelu and not _hooked(act) and self._fp8_into(linear, self.gelu_concat_fp8_fn)

    def gelu_concat_linear(self, linear: nn.Module, act: nn.Module, prefix, x):
        """linear(cat([prefix, act(x)], -1)), the single-stream block's output projection; fp8 `linear` after a tanh
        GELU: gelu_concat_fp8's e4m3 output (no bf16 GELU output, no concatenated copy, no separate quantiser).
        prefix: a tensor, or attention_before_concat's (e4m3 codes, channel scales)."""
        if self._gelu_concat_fp8_into(linear, act):
            prefix, prefix_scale = prefix if isinstance(prefix, tuple) else (prefix, None)
            return linear(*self.gelu_concat_fp8_fn(prefix, x, prefix_scale), out_dtype=x.dtype)
        if isinstance(prefix, tuple):
            from flux_kernels.gelu_fp8 import dequantize_prefix

            prefix = dequantize_prefix(*prefix, x.dtype)
        return linear(torch.cat([prefix, act(x)], dim=2))


def _hooked(module: nn.Module) -> bool:
    """Whether `module` has forward hooks of its own (calling its children directly would skip them)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)
