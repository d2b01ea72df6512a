"""The attention processors a transformer with the engine's fused blocks would never call (engine.block_guards):
a custom or IP-Adapter processor, set on the transformer before optimize() or after it, or on one attention module
after it (`attn.set_processor(...)`, `attn.processor = ...`), which only the per-call check sees."""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError

PROCESSORS = ("FluxAttnProcessor", "FluxAttnProcessor2_0")  # diffusers' own, which the fused blocks replace
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_processor_types(model: nn.Module, name: str = "transformer") -> None:
    """Refuse attention processors the fused blocks would not call (a custom or IP-Adapter processor) and a dtype the
    kernels do not take (block_guards.check_processors: also diffusers hooks inside the blocks)."""
    dtype = next(model.parameters()).dtype
    if dtype not in KERNEL_DTYPES:
        raise ConfigError(
            f"{name} is {dtype}; the engine's fused kernels take {', '.join(map(str, KERNEL_DTYPES))}: convert the "
            "pipeline (pipe.to(torch.bfloat16)) before optimize(), or use the 'baseline' or 'compile' preset"
        )
    processors = getattr(model, "attn_processors", {})
    foreign = sorted({type(p).__name__ for p in processors.values() if type(p).__name__ not in PROCESSORS})
    if foreign:
        ip_adapter = any("IPAdapter" in kind for kind in foreign)
        raise ConfigError(
            f"{name} has attention processors {foreign}; the engine's fused blocks compute diffusers' "
            f"{PROCESSORS[0]} and would never call them (a different image, without a word). Use the 'baseline' or "
            "'compile' preset, or "
            + (
                "pipe.unload_ip_adapter() first (an IP-Adapter: the fused blocks cannot run it)"
                if ip_adapter
                else f"{name}.set_attn_processor(FluxAttnProcessor()) first"
            )
        )


def check_processors_each_call(model: nn.Module) -> None:
    """Each call: a processor set on one attention module after optimize() (past the transformer's guarded
    set_attn_processor) is refused; before, it was taken and never called (a silently different image)."""
    attention = model.__dict__.get("_engine_attention_modules")
    if attention is None:
        attention = model.__dict__["_engine_attention_modules"] = [
            (name, m) for name, m in model.named_modules() if hasattr(m, "get_processor")
        ]
    for name, module in attention:
        if type(module.processor).__name__ not in PROCESSORS:
            raise ConfigError(
                f"{type(model).__name__}.{name} has the attention processor {type(module.processor).__name__}, set "
                f"after optimize(); the engine's fused blocks compute diffusers' {PROCESSORS[0]} and would never call "
                "it (a different image, without a word). Nothing was run. Set diffusers' own back "
                "(`set_attn_processor(FluxAttnProcessor())`), or use a pipeline optimised with the 'baseline' or "
                "'compile' preset (engine.restore(pipe) first)"
            )


def refuse_processor(model: nn.Module, processor=None, *args, **kwargs):
    """set_attn_processor: diffusers' own processor (what the fused blocks compute) is let through, others refused."""
    chosen = processor.values() if isinstance(processor, dict) else [processor]
    if all(type(p).__name__ in PROCESSORS for p in chosen):
        return type(model).set_attn_processor(model, processor, *args, **kwargs)
    what = type(processor).__name__ if not isinstance(processor, dict) else "a dict of processors"
    model_name = type(model).__name__
    raise ConfigError(
        f"{model_name}.set_attn_processor({what}) after optimize(): the engine's fused blocks compute diffusers' "
        f"{PROCESSORS[0]} and would never call it (a different image, without a word). Set it on a pipeline "
        "optimised with the 'baseline' or 'compile' preset (or call engine.restore(pipe) first)"
    )
