"""`joint_attention_kwargs` on an optimised transformer, sorted as diffusers' attention modules sort them.

diffusers' `FluxAttention.forward` passes its processor the keys that the processor's `__call__` names and drops
the others, with a warning for all but IP-Adapter's two (`ip_adapter_masks`, `ip_hidden_states`, dropped without
a word). So a plain FluxPipeline called with a key no processor takes warns and makes its usual image. On the engine
that call failed: on compiled blocks (`compile` and every `*-compile` preset) dynamo stops at the logger call
("logging.Logger methods are not supported"), and the fused blocks refused every key. A forward pre-hook on the
optimised transformer does diffusers' sorting once a call, in eager, before any compiled region: the keys no processor
takes are dropped, with diffusers' warning (once a call, where diffusers warns once an attention module); the keys
every processor takes pass on as they are (the fused blocks still refuse them, before an image is made: they are
IP-Adapter's and the like, which those blocks cannot run); a key only some processors take is refused (diffusers
drops it for the others with a logger call, which fails inside compiled blocks). `scale` and `ip_adapter_image_embeds`
are the model's own keys (the LoRA scale, IP-Adapter's image embeddings): they pass on too. The caller's dict is never
changed.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch

from .errors import InputError

# the keys the model's forward takes out itself (diffusers' apply_lora_scale and FluxTransformer2DModel.forward)
MODEL_KEYS = frozenset({"scale", "ip_adapter_image_embeds"})
# the keys diffusers drops without a warning when a processor does not take them (FluxAttention.forward)
QUIET_KEYS = frozenset({"ip_adapter_masks", "ip_hidden_states"})
# diffusers' logger of the Flux attention modules: its warning, word for word, where diffusers would print it
_DIFFUSERS_LOGGER = logging.getLogger("diffusers.models.transformers.transformer_flux")


def _processors(model: torch.nn.Module) -> list:
    return [
        block.attn.processor
        for name in ("transformer_blocks", "single_transformer_blocks")
        for block in getattr(model, name, ())
        if getattr(getattr(block, "attn", None), "processor", None) is not None
    ]


def sort_joint_attention_kwargs(model: torch.nn.Module, kwargs: dict) -> dict | None:
    """`kwargs` (the model's call arguments) with the `joint_attention_kwargs` keys that no attention processor of
    `model` takes left out (diffusers' warning for those it warns of); None where nothing is left out."""
    given = kwargs.get("joint_attention_kwargs")
    if not given or not (set(given) - MODEL_KEYS):  # the usual call: none, or the LoRA scale alone
        return None
    processors = _processors(model)
    takes = [_parameters(type(processor)) for processor in processors]
    taken, by_all = set().union(*takes), set.intersection(*map(set, takes)) if takes else set()
    partly = sorted(key for key in given if key in taken and key not in by_all and key not in QUIET_KEYS)
    if partly:
        raise InputError(
            f"joint_attention_kwargs {partly} are taken by some of the transformer's attention processors "
            f"({', '.join(sorted({type(p).__name__ for p in processors}))}) and not by the others, which diffusers "
            "would tell with a logger call that fails inside compiled blocks. Set one processor on every block "
            "(pipe.transformer.set_attn_processor(...)), or pass the key only to a pipeline optimised with 'baseline'"
        )
    dropped = [key for key in given if key not in MODEL_KEYS and key not in taken]
    if not dropped:
        return None
    warned = [key for key in dropped if key not in QUIET_KEYS]
    if warned:
        names = sorted({type(processor).__name__ for processor in processors}) or ["FluxAttnProcessor"]
        _DIFFUSERS_LOGGER.warning(
            f"joint_attention_kwargs {warned} are not expected by {', '.join(names)} and will be ignored."
        )
    return {**kwargs, "joint_attention_kwargs": {key: value for key, value in given.items() if key not in dropped}}


@functools.lru_cache(maxsize=64)
def _parameters(processor_class: type) -> frozenset:
    """The argument names of a processor class's __call__ (inspect.signature: ~10 us, once a class)."""
    return frozenset(inspect.signature(processor_class.__call__).parameters)


def _sort_before_forward(module, args, kwargs):
    sorted_kwargs = sort_joint_attention_kwargs(module, kwargs)
    return None if sorted_kwargs is None else (args, sorted_kwargs)


def install_joint_kwargs_sorting(models) -> callable:
    """Sort each of `models`' `joint_attention_kwargs` (the transformer's) before its forward; returns the undo."""
    handles = [model.register_forward_pre_hook(_sort_before_forward, with_kwargs=True) for model in models]

    def undo() -> None:
        for handle in handles:
            handle.remove()

    return undo
