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

import logging

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from torch import nn

from .block_ops import BlockOps
from .config import AttentionConfig
from .errors import ConfigError, InputError
from .lora import is_lora_layer

logger = logging.getLogger(__name__)

# shape used by backend="auto" to pick the attention core: FLUX at 1024^2 (4096 image + 512 text tokens)
AUTO_PROBE_TOKENS = 4608


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
        attn_out = ops.attention_before_concat(query, key, value, self.proj_out, self.act_mlp)
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
        "a diffusers hook is still on it: remove a cache (pipe.transformer.disable_cache()); group offloading cannot "
        "be removed: load the pipeline again. Then optimize(), with EngineConfig(step_cache=..., offload=...)"
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
    generator = torch.Generator(device=device).manual_seed(0)  # not the default one: engine.warmup says why
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=generator) for _ in range(3))
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


def rewires_blocks(config: AttentionConfig, force: bool = False) -> bool:
    """Whether apply_attention turns the blocks into the engine's fused ones (diffusers' own path: not, unless
    `force`)."""
    return not (config.backend == "sdpa" and not config.fused_norms) or force


def apply_attention(pipe, config: AttentionConfig, force: bool = False) -> BlockOps | None:
    """Rewire `pipe.transformer`'s blocks for `config`; None (nothing done) for diffusers' own path, unless `force`
    (context parallelism splits the attention call of the engine's blocks: diffusers' maths, fused QKV)."""
    if not rewires_blocks(config, force):
        return None
    transformer = pipe.transformer
    ops = resolve_ops(config, transformer)
    convert_blocks(transformer, ops)
    return ops


def convert_blocks(model, ops: BlockOps) -> None:
    """Rewire the double- and single-stream blocks of `model` (a FluxTransformer2DModel, or a FluxControlNetModel:
    the same block classes) onto `ops`, in place, with engine.block_guards on the model; `remove_attention(model)`
    undoes it. A custom attention processor, which the fused blocks would not call, is refused first."""
    from .block_guards import check_processors, install_block_guards

    check_processors(model, type(model).__name__)
    for index, block in enumerate(model.transformer_blocks):
        _convert_double(block, ops, f"transformer_blocks.{index}")
    for index, block in enumerate(model.single_transformer_blocks):
        _convert_single(block, ops, f"single_transformer_blocks.{index}")
    install_block_guards(model)


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
    from .block_guards import remove_block_guards

    remove_block_guards(transformer)
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
