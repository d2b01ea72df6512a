"""The attention kernels that a first call at a new size would have compiled, compiled while the engine is built.

On the H200 (torch 2.11, cuDNN 9), PyTorch's SDPA runs FLUX's bf16 attention through cuDNN, and cuDNN's attention
kernels, like those of the engine's 'cudnn-fp8' core, are compiled at run time (NVRTC, then the CUDA driver, which
keeps the result in its JIT cache, ~/.nv/ComputeCache): one kernel for sequence lengths that are multiples of 128
and another for the rest. On a machine whose cache lacks one, the first call at a length of its kind paid for the
compile: 1360x768's 4592 tokens 606 ms in SDPA's first call, against 38-58 ms at any other new length (the graph's
build), and a fresh machine's first 1360x768 image 0.54-0.61 s over a warm call against 0.14-0.16 with the cache
filled (benchmarks/NOTES.md, 2026-12-01 08:09 and 08:16). `warm_attention` runs the transformer's attention core
once at a length of each kind when the engine is built, so that the compile happens there, once per machine, and
not in a request. `warm_text_encoders` does the same for the prompt encoding, whose attention compiles its own
kernels (head size 64: the first `encode_prompt` on an empty JIT cache took 1281 ms, the second 36 ms; NOTES 08:32).
FLUX_ENGINE_WARM_ATTENTION=0 turns both off.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ENV = "FLUX_ENGINE_WARM_ATTENTION"
# one length of each kind cuDNN compiles its own kernel for: a multiple of 128, and not
WARM_TOKENS = (256, 272)


def enabled() -> bool:
    """FLUX_ENGINE_WARM_ATTENTION: unset or 1 on, 0 off; anything else is refused."""
    value = os.environ.get(ENV, "1")
    if value not in ("0", "1", ""):
        raise ValueError(f"{ENV}={value!r}: set it to 1 (compile the attention kernels at start) or 0 (do not)")
    return value != "0"


def warm_call(core: str | None):
    """The attention function whose run-time compiled kernels a core uses: q, k, v [B, H, L, D] -> output; None for
    the Triton cores (their kernels are compiled ahead, or come with the package)."""
    if core in (None, "sdpa"):
        return F.scaled_dot_product_attention
    if core == "cudnn-fp8":
        from flux_kernels.cudnn_attention import cudnn_fp8_attention

        return cudnn_fp8_attention
    return None


def warm_attention(transformer, core: str | None) -> dict | None:
    """Run `core` (the engine's BlockOps.core; None: diffusers' own processors, which call SDPA) once at each of
    WARM_TOKENS with the transformer's heads and head size, in the blocks' memory layout ([B, L, H, D] read as
    [B, H, L, D]). Returns {"core", "ms": {tokens: ms}}; None when nothing ran (not on CUDA, a Triton core, off)."""
    device = transformer.device
    call = warm_call(core)
    if device.type != "cuda" or call is None or not enabled():
        return None
    attn = transformer.transformer_blocks[0].attn
    dtype = transformer.dtype if transformer.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    timings = {}
    # a generator of its own: drawing from the device's default one would change the noise of a later call with
    # generator=None after torch.manual_seed (diffusers' images then differ from ours)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for tokens in WARM_TOKENS:
            q, k, v = (
                torch.randn(1, tokens, attn.heads, attn.head_dim, device=device, dtype=dtype, generator=generator)
                .transpose(1, 2)
                for _ in range(3)
            )  # fmt: skip
            start = time.perf_counter()
            call(q, k, v)
            torch.cuda.synchronize(device)
            timings[tokens] = round((time.perf_counter() - start) * 1e3, 1)
    logger.info("attention kernels compiled at start (%s): %s ms", core or "sdpa", timings)
    return {"core": core or "sdpa", "ms": timings}


def warm_text_encoders(pipe) -> float | None:
    """One `encode_prompt` of a short prompt (at the default 512 T5 tokens) when both text encoders sit on a CUDA
    device: the run-time compiles and first loads of the prompt encoding happen here, not in the first call. Returns
    its seconds; None when nothing ran (an encoder missing or not on CUDA, e.g. offloaded; or switched off)."""
    encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
    if any(encoder is None for encoder in encoders) or not hasattr(pipe, "encode_prompt"):
        return None
    devices = {param.device.type for encoder in encoders for param in encoder.parameters()}
    if devices != {"cuda"} or not enabled():
        return None
    start = time.perf_counter()
    with torch.no_grad():
        pipe.encode_prompt(prompt="a photo", prompt_2=None, max_sequence_length=512)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    logger.info("prompt encoding warmed at start: %.3f s", seconds)
    return seconds
