"""The FLUX transformer blocks on our kernels: fused QKV, QK-RMSNorm + RoPE, attention, adaLN modulate.

`apply_attention(pipe, config)` rewires every double- and single-stream block of the transformer in
place (weights are shared, never copied):

- QKV projections fused into one GEMM per stream (and, in single-stream blocks, with the MLP input
  projection too: BFL's `linear1`); the original Linear modules become views of the fused weight, so
  memory does not grow and diffusers' own processors still work on them. Projections that are already
  quantised (a quantised load or checkpoint) are fused exactly, row by row, in their quantised form;
- q/k RMSNorm + rotary embedding + [text, image] concat + head-major layout in one pass
  (`flux_kernels.qk_norm_rope`) when `fused_norms` is on, else the same math in PyTorch;
- the attention core: our Triton flash attention, PyTorch SDPA, or "auto" (the faster of the two,
  measured on this GPU when the config is applied);
- LayerNorm + shift/scale modulation and the gated residual before norm2
  (`flux_kernels.layernorm_modulate`, `gated_residual_layernorm_modulate`) when `fused_norms` is on; when the
  projection after one of them is an fp8 layer (engine.quant.fp8.Fp8Linear), the kernel writes its output as
  e4m3 values with per-token scales (the `*_fp8` variants) and the layer skips its own activation quantisation;
  so does the fp8 projection after each MLP's tanh GELU (`flux_kernels.gelu_fp8.gelu_concat_fp8`, which in the
  single-stream block also takes the attention output that proj_out's input concatenates).

The blocks become instances of subclasses of diffusers' own block classes (`__class__` swap), so
module names, state dict keys and hooks stay as they were.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.activations import GELU
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from torch import nn

from .config import AttentionConfig
from .errors import ConfigError, InputError
from .lora import active_lora, add_fused_lora, fp8_lora_ready, is_lora_layer

logger = logging.getLogger(__name__)

# shape used by backend="auto" to pick the attention core: FLUX at 1024^2 (4096 image + 512 text tokens)
AUTO_PROBE_TOKENS = 4608


# ----------------------------------------------------------------------------- the ops, by switch


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

    @classmethod
    def build(cls, core: str, fused_norms: bool) -> BlockOps:
        from flux_kernels import layernorm_modulate as norm
        from flux_kernels import qk_norm_rope as qk

        flash = None
        if core == "triton":
            from flux_kernels.flash_attention import flash_attention as flash
        elif core == "triton-fp8":
            from flux_kernels.fp8_attention import quantized_attention as flash
        elif core == "cudnn-fp8":
            from flux_kernels.cudnn_attention import cudnn_fp8_attention_pairs as flash
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
        return cls(core, fused_norms, *fns, flash, *fp8_fns, qk_norm_rope_grouped_fn=grouped)

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
            out = linear(normed, normed_scale, out_dtype=x.dtype)
            return out if layers is None else add_fused_lora(out, parts, layers, normed, normed_scale, linear)
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

    def gelu_concat_linear(self, linear: nn.Module, act: nn.Module, prefix, x):
        """linear(cat([prefix, act(x)], -1)), the single-stream block's output projection; fp8 `linear` after a tanh
        GELU: gelu_concat_fp8's e4m3 output (no bf16 GELU output, no concatenated copy, no separate quantiser)."""
        tanh_gelu = isinstance(act, nn.GELU) and act.approximate == "tanh"
        if tanh_gelu and not _hooked(act) and self._fp8_into(linear, self.gelu_concat_fp8_fn):
            return linear(*self.gelu_concat_fp8_fn(prefix, x), out_dtype=x.dtype)
        return linear(torch.cat([prefix, act(x)], dim=2))


def _hooked(module: nn.Module) -> bool:
    """Whether `module` has forward hooks of its own (calling its children directly would skip them)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


# ----------------------------------------------------------------------------- fused projections


def fuse_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear computing all of `linears` (outputs concatenated); the originals become views of it."""
    in_features = linears[0].in_features
    if any(lin.in_features != in_features or lin.bias is None for lin in linears):
        raise ConfigError("fuse_linears needs Linear layers with the same input width and biases")
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = torch.cat([lin.bias.detach() for lin in linears])
    with torch.device("meta"):
        fused = nn.Linear(in_features, weight.shape[0], bias=True)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    fused.bias = nn.Parameter(bias, requires_grad=False)
    offset = 0
    for lin in linears:
        rows = lin.out_features
        lin.weight = nn.Parameter(weight[offset : offset + rows], requires_grad=False)
        lin.bias = nn.Parameter(bias[offset : offset + rows], requires_grad=False)
        offset += rows
    return fused


# ----------------------------------------------------------------------------- the blocks


def _reject_attention_kwargs(joint_attention_kwargs) -> None:
    if joint_attention_kwargs:
        raise InputError(
            f"joint_attention_kwargs {sorted(joint_attention_kwargs)} (IP-Adapter and the like) are not supported by "
            "the engine's fused attention blocks; use the 'baseline' preset for them"
        )


class EngineDoubleBlock(FluxTransformerBlock):
    """FluxTransformerBlock with fused QKV, the QK-norm+RoPE kernel and fused adaLN modulation."""

    # each fused projection, and the diffusers projections it holds as views (in column order)
    fused_projections = {
        "qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "txt_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    }

    flux_ops: BlockOps
    qkv: nn.Linear
    txt_qkv: nn.Linear

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        _reject_attention_kwargs(joint_attention_kwargs)
        ops, attn = self.flux_ops, self.attn
        eps = self.norm2.eps
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1.linear(self.norm1.silu(temb)).chunk(
            6, dim=1
        )
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context.linear(
            self.norm1_context.silu(temb)
        ).chunk(6, dim=1)
        query, key, value = ops.qk_norm_rope(
            ops.modulated_linear(
                self.qkv, hidden_states, shift_msa, scale_msa, eps, [attn.to_q, attn.to_k, attn.to_v]
            ),  # [B, L_img, 3*H*D]
            attn.norm_q.weight,
            attn.norm_k.weight,
            image_rotary_emb,
            attn.heads,
            attn.norm_q.eps,
            txt_qkv=ops.modulated_linear(
                self.txt_qkv,
                encoder_hidden_states,
                c_shift_msa,
                c_scale_msa,
                eps,
                [attn.add_q_proj, attn.add_k_proj, attn.add_v_proj],
            ),  # fmt: skip
            txt_q=attn.norm_added_q.weight,
            txt_k=attn.norm_added_k.weight,
        )
        joint = ops.attention(query, key, value)  # [B, L_txt + L_img, H*D]
        text_tokens = encoder_hidden_states.shape[1]
        context_attn, hidden_attn = joint[:, :text_tokens], joint[:, text_tokens:]
        hidden_attn = attn.to_out[0](hidden_attn)
        context_attn = attn.to_add_out(context_attn)

        hidden_states, ff_out = ops.modulated_feed_forward(
            self.ff, hidden_states, hidden_attn, gate_msa, shift_mlp, scale_mlp, eps
        )
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * ff_out
        encoder_hidden_states, ff_context_out = ops.modulated_feed_forward(
            self.ff_context, encoder_hidden_states, context_attn, c_gate_msa, c_shift_mlp, c_scale_mlp, eps
        )
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * ff_context_out
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


class EngineSingleBlock(FluxSingleTransformerBlock):
    """FluxSingleTransformerBlock with QKV and the MLP input fused into one GEMM (BFL's linear1)."""

    fused_projections = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}

    flux_ops: BlockOps
    linear1: nn.Linear

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        _reject_attention_kwargs(joint_attention_kwargs)
        ops, attn = self.flux_ops, self.attn
        text_tokens = encoder_hidden_states.shape[1]
        residual = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # [B, L, C]
        shift, scale, gate = self.norm.linear(self.norm.silu(temb)).chunk(3, dim=1)
        parts = [attn.to_q, attn.to_k, attn.to_v, self.proj_mlp]
        projected = ops.modulated_linear(
            self.linear1, residual, shift, scale, self.norm.norm.eps, parts
        )  # [B, L, 3HD+mlp]
        qkv_width = 3 * attn.heads * attn.head_dim
        query, key, value = ops.qk_norm_rope(
            projected[..., :qkv_width], attn.norm_q.weight, attn.norm_k.weight, image_rotary_emb, attn.heads,
            attn.norm_q.eps,
        )  # fmt: skip
        attn_out = ops.attention(query, key, value)
        out = ops.gelu_concat_linear(self.proj_out, self.act_mlp, attn_out, projected[..., qkv_width:])
        hidden_states = residual + gate.unsqueeze(1) * out
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states[:, :text_tokens], hidden_states[:, text_tokens:]


def _fuse_projections(block: nn.Module, block_name: str, fused_name: str, names: tuple[str, ...]) -> nn.Module:
    """The fused Linear of `block`'s projections `names`. Unquantised: `fuse_linears` (the originals become
    views). Already quantised (quantised while loading, or loaded from a quantised checkpoint): the quantised
    rows are concatenated exactly (engine.quant.layers.fuse_quantized_linears) and the originals, which would keep
    their own copy alive, become FusedAway placeholders, as quantising after fusing leaves them."""
    from .quant.apply import is_quantized_layer
    from .quant.layers import fuse_quantized_linears, replace_by_fused_away

    parts = [block.get_submodule(name) for name in names]
    if not any(is_quantized_layer(part) for part in parts):
        return fuse_linears(parts)
    full_name = f"{block_name}.{fused_name}" if block_name else fused_name
    fused = fuse_quantized_linears(parts, full_name)
    replace_by_fused_away(block, full_name, fused_name, names)
    return fused


def _convert(block: nn.Module, engine_class: type, ops: BlockOps, name: str) -> None:
    _drop_stale_forward(block, name)
    for fused_name, names in engine_class.fused_projections.items():
        setattr(block, fused_name, _fuse_projections(block, name, fused_name, names))
    block.__class__ = engine_class
    block.flux_ops = ops


def _drop_stale_forward(block: nn.Module, name: str) -> None:
    """A diffusers hook (enable_cache, group offloading) replaces the block's `forward` on the instance; removed, it
    leaves the class's bound forward there, which would shadow the engine block's. That is dropped; a hook still on
    the block is refused (it would call diffusers' processors on the fused projections)."""
    stale = block.__dict__.get("forward")
    if stale is None:
        return
    if getattr(stale, "__func__", None) is type(block).forward:
        del block.forward
        return
    raise ConfigError(
        f"{name or type(block).__name__} has its forward replaced by a hook ({getattr(stale, '__qualname__', stale)}); "
        "a diffusers cache or offload hook is still on the transformer: call pipe.transformer.disable_cache() (or "
        "remove the hook) before optimize(), and use EngineConfig(step_cache=...) for step caching"
    )


def _convert_double(block: FluxTransformerBlock, ops: BlockOps, name: str = "") -> None:
    _convert(block, EngineDoubleBlock, ops, name)


def _convert_single(block: FluxSingleTransformerBlock, ops: BlockOps, name: str = "") -> None:
    _convert(block, EngineSingleBlock, ops, name)


# ----------------------------------------------------------------------------- choosing the core


def _time_ms(fn, device: torch.device, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def pick_attention_core(heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[str, dict]:
    """'triton' or 'sdpa', whichever runs FLUX's 1024^2 attention faster here; with the timings (ms)."""
    from flux_kernels import triton_runnable

    if (
        device.type != "cuda"
        or not triton_runnable(device)
        or head_dim not in (64, 128)
        or dtype not in (torch.bfloat16, torch.float16)
    ):
        return "sdpa", {}  # our kernel does not take this model: nothing to measure
    from flux_kernels.flash_attention import flash_attention

    shape = (1, heads, AUTO_PROBE_TOKENS, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    timings = {
        "triton": _time_ms(lambda: flash_attention(q, k, v), device),
        "sdpa": _time_ms(lambda: F.scaled_dot_product_attention(q, k, v), device),
    }
    return min(timings, key=timings.get), timings


def _cudnn_fp8_unavailable(device: torch.device) -> str | None:
    from flux_kernels.cudnn_attention import unavailable_reason

    return unavailable_reason(device) if device.type == "cuda" else f"the model is on {device.type}, not a CUDA GPU"


def resolve_ops(config: AttentionConfig, transformer) -> BlockOps:
    from flux_kernels import triton_runnable

    device, dtype = transformer.device, transformer.dtype
    if config.needs_triton and not triton_runnable(device):
        raise ConfigError(
            f"attention backend={config.backend!r} fused_norms={config.fused_norms} runs Triton kernels, which need "
            f"a CUDA GPU (or TRITON_INTERPRET=1 on a CPU, for tests); the model is on {device.type}. Use the "
            "'baseline' preset here"
        )
    if config.backend in ("triton", "triton-fp8", "cudnn-fp8") and dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError(
            f"attention backend={config.backend!r} runs in bf16 or fp16, the transformer is {dtype}; load it in bf16, "
            "or use backend='auto' (it falls back to SDPA)"
        )
    if (
        config.backend == "triton-fp8"
        and device.type == "cuda"
        and (major := torch.cuda.get_device_capability(device)[0]) != 9
    ):
        raise ConfigError(f"attention backend='triton-fp8' is tuned and tested on Hopper (sm 9.x) only, this GPU is sm "
                          f"{major}.x; use backend 'auto' or a preset without 'fp8attn'")  # fmt: skip
    if config.backend == "cudnn-fp8" and (reason := _cudnn_fp8_unavailable(device)) is not None:
        raise ConfigError(f"attention backend='cudnn-fp8' cannot run here: {reason}; use backend 'auto' (a preset "
                          "without 'cudnnattn')")  # fmt: skip
    core = config.backend
    if core == "auto":
        first = transformer.transformer_blocks[0].attn
        core, timings = pick_attention_core(first.heads, first.head_dim, dtype, device)
        logger.info("attention backend auto -> %s (%s)", core, timings)
    return BlockOps.build(core, config.fused_norms)


def apply_attention(pipe, config: AttentionConfig, force: bool = False) -> BlockOps | None:
    """Rewire `pipe.transformer`'s blocks for `config`; None (nothing done) for diffusers' own path, unless `force`
    (context parallelism splits the attention call of the engine's blocks: diffusers' maths, fused QKV)."""
    if config.backend == "sdpa" and not config.fused_norms and not force:
        return None
    transformer = pipe.transformer
    ops = resolve_ops(config, transformer)
    convert_blocks(transformer, ops)
    return ops


def convert_blocks(model, ops: BlockOps) -> None:
    """Rewire the double- and single-stream blocks of `model` (a FluxTransformer2DModel, or a FluxControlNetModel:
    the same block classes) onto `ops`, in place; `remove_attention(model)` undoes it."""
    for index, block in enumerate(model.transformer_blocks):
        _convert_double(block, ops, f"transformer_blocks.{index}")
    for index, block in enumerate(model.single_transformer_blocks):
        _convert_single(block, ops, f"single_transformer_blocks.{index}")


# each engine block class and the diffusers class it came from
_ORIGINAL_CLASS = {EngineDoubleBlock: FluxTransformerBlock, EngineSingleBlock: FluxSingleTransformerBlock}


def attention_undo_blocker(transformer) -> str:
    """Why `remove_attention` cannot restore `transformer` ('' when it can): projections that were quantised before
    fusing were concatenated into one quantised layer, and their originals replaced by placeholders."""
    from .quant.fp8 import FusedAway

    for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
        if any(isinstance(module, FusedAway) for module in block.modules()):
            return "its projections were quantised before they were fused, and only the fused copy is left"
    return ""


def remove_attention(transformer) -> None:
    """Undo apply_attention: each projection gets its own weights back (copies of its rows of the fused weight: the
    same values), the fused layers and the ops go, and the blocks are diffusers' classes again."""
    for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
        original_class = _ORIGINAL_CLASS.get(type(block))
        if original_class is None:
            continue
        for fused_name, names in block.fused_projections.items():
            for name in names:
                linear = block.get_submodule(name)
                linear = linear.base_layer if is_lora_layer(linear) else linear  # under a PEFT adapter
                linear.weight = nn.Parameter(linear.weight.detach().clone())
                linear.bias = nn.Parameter(linear.bias.detach().clone())
            delattr(block, fused_name)
        del block.flux_ops
        block.__class__ = original_class
