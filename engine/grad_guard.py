"""A forward that records gradients through what optimize() put in the transformer, refused where the gradients would
be wrong without a word.

The engine is made for inference. Its Triton kernels (fused norms, QK-norm + RoPE, the attention cores) and its fp8
GEMMs register no backward, and blocks streamed from host memory hand autograd views of ring slots that later blocks
overwrite before the backward runs (the in-place change hidden from autograd's version counters). A LoRA trained
through them (measured on the CPU: fp8's input gradients rounded to e4m3 without a scale, cosine 0.017 to the right
ones at typical sizes; streamed blocks' LoRA gradients cosine down to -0.27) learns from wrong gradients and nothing
says so. diffusers' pipelines call the transformer under torch.no_grad(), so their calls never meet this; a
training loop, or a call whose inputs require grad, does: its forward runs, and the backward from its output is
refused before any gradient is computed. The fused blocks in PyTorch (backend 'sdpa' without fused norms: the CPU's
'auto'), regional compile, quanto's and bitsandbytes' layers keep exact gradients and are let through.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .errors import ConfigError


def backward_blockers(pipe) -> list[str]:
    """What optimize() put in `pipe`'s transformer that has no correct backward, in words (empty: none)."""
    blockers = []
    ops = getattr(pipe, "attention_ops", None)
    if ops is not None and (ops.core != "sdpa" or ops.fused_norms):
        kernels = "fused-norm kernels" if ops.fused_norms else ""
        blockers.append(f"Triton kernels (attention core {ops.core!r}{', ' + kernels if kernels else ''})")
    from .quant.apply import quant_mode_of

    if quant_mode_of(getattr(pipe, "transformer", None)) == "fp8":
        blockers.append("fp8 GEMMs (activations cast to e4m3)")
    offload = getattr(pipe, "offload_state", None)
    if offload is not None and offload.policy in ("block", "leaf"):
        blockers.append(f"blocks streamed from host memory (offload {offload.policy!r})")
    if getattr(pipe, "parallel_state", None) is not None:
        blockers.append("the token exchanges between GPUs")
    return blockers


def install_grad_guard(transformer: nn.Module, blockers: list[str]):
    """The refusal as a forward hook on `transformer`; its handle (None when nothing blocks a backward). The forward
    itself runs (a direct call with grad mode on, for inference, gets its output); a backward from that output
    raises before any gradient is computed."""
    if not blockers:
        return None
    return transformer.register_forward_hook(functools.partial(_refuse_backward, blockers))


def _refuse_backward(blockers: list[str], transformer: nn.Module, args: tuple, output) -> None:
    if not torch.is_grad_enabled():  # every diffusers pipeline call: one flag read
        return
    sample = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
    if isinstance(sample, torch.Tensor) and sample.requires_grad:
        sample.register_hook(functools.partial(_refuse, type(transformer).__name__, blockers))


def _refuse(model_name: str, blockers: list[str], grad: torch.Tensor):
    raise ConfigError(
        f"a backward through {model_name} optimised with the engine's {'; '.join(blockers)}: they have no correct "
        "backward, so the gradients would be wrong without a word (nothing was computed). For inference, call it "
        "under torch.no_grad() or torch.inference_mode(); to train (a LoRA, say), use a pipeline optimised with "
        "'baseline' or 'compile', or engine.restore(pipe) first"
    )
