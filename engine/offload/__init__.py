"""Offload policies: where the weights live between uses, and how they reach the GPU in time.

`apply_offload(pipe, config, device)` places a pipeline's components for `EngineConfig.offload`:

- 'none': everything on `device`.
- 'model': the text encoders live in pinned host memory and visit the GPU only for `encode_prompt`
  (CLIP whole, in one DMA; T5 block by block through transient slots: the same bytes as moving it whole,
  a twelfth of the peak; nothing is copied back, the host copy is kept); prompt embeddings are cached
  per prompt. Transformer and VAE stay on the GPU.
- 'block': 'model', plus the transformer's 57 blocks (and T5's 24) live in pinned host memory, each
  block packed into one contiguous buffer so that bringing it in is one DMA. A ring of
  `blocks_resident` GPU slots holds the blocks in use; while block i computes on the default stream,
  block i+1 is copied into the next slot on a side stream (events order the two), so copies hide
  behind compute whenever a block's compute takes longer than its copy.
- 'leaf': the same with one Linear at a time (other weights in the blocks, a few norm scales, stay on the
  GPU): the lowest VRAM. The
  order the leaves run in is learnt on the first forward, which loads each on demand; later forwards
  prefetch along it. Leaf hooks sit inside the blocks, so 'leaf' does not combine with compile.

The blocks' parameters are never re-created: `param.data` points at a view of the host buffer
between uses and at a view of a GPU slot while the block runs, so module names, state dicts, the
compiled regions (parameters are graph inputs) and quantised layers (fp8 buffers, bitsandbytes
Params4bit with their quant_state) all keep working. Block iteration is intercepted by swapping the
class of the blocks' ModuleList (`__iter__` yields a thin caller while the model runs), so the
hooks stay outside the compiled regions and `fullgraph=True` hol

    engine.offload.policies      apply_offload and the policies
    engine.offload.streamer      packed units, the slot ring, the block hooks, whole modules on demand
    engine.offload.prompt_cache  prompt embeddings cached per prompt
    engine.offload.compact       resident weights re-laid into one buffer
    engine.offload.bandwidth     the measured host-to-device bandwidth
"""

from __future__ import annotations

from .bandwidth import measure_h2d_bandwidth
from .compact import compact, compact_resident
from .policies import OffloadState, apply_offload, leaf_groups, remove_offload, transformer_block_lists
from .prompt_cache import PromptCache
from .streamer import StreamedModuleList, Streamer, module_tensors

__all__ = [
    "OffloadState",
    "PromptCache",
    "StreamedModuleList",
    "Streamer",
    "apply_offload",
    "compact",
    "compact_resident",
    "leaf_groups",
    "measure_h2d_bandwidth",
    "module_tensors",
    "remove_offload",
    "transformer_block_lists",
]
