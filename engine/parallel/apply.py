"""apply_parallel: one FluxPipeline running on every rank of a process group, each rank's transformer working on its
share of the tokens; remove_parallel undoes it.

What each rank does per image:
- the text encoders run on rank 0 only; their embeddings are broadcast (`encode_prompt`, wrapped on the instance);
- the initial noise is rank 0's, broadcast (`prepare_latents`): every rank denoises the same latents whatever
  generator it was given, and a rank called with another size or batch is told so instead of hanging;
- the transformer's inputs are split by the SplitSequenceHook and attention exchanges tokens for heads
  (engine/parallel/exchange.py); its output is gathered, so the scheduler steps the whole latents on every rank;
- the VAE decode is split by tiles when the config tiles this size (engine/vae.py, `world`): each rank decodes
  every size-th tile, the tiles are all-gathered and blended.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from ..cuda_graphs import drop_captured_graphs
from ..errors import ConfigError
from .config import ParallelConfig
from .exchange import SequenceShards, register_shards, unregister_shards
from .runtime import World, before_destroy, broadcast_tensor, check_same_everywhere, init_distributed
from .sequence import install_split, remove_split

_WRAPPED = ("encode_prompt", "prepare_latents")


@dataclass
class ParallelState:
    """What apply_parallel installed on a pipeline."""

    config: ParallelConfig
    world: World
    shards: SequenceShards
    shards_id: int
    ops_before: Any = field(repr=False)  # the blocks' BlockOps without the exchange
    _shadowed: dict = field(default_factory=dict, repr=False)  # instance attributes our wrappers replaced
    progress_bar_config: dict | None = None  # a rank other than 0's, before its bar was turned off

    @property
    def returns_images(self) -> bool:
        """Rank 0 returns the images; the other ranks' FluxEngine calls return None, as the docs of torchrun
        scripts expect (one image per job, not one per GPU)."""
        return self.world.is_main


def check_rank_device(transformer, world: World) -> None:
    device = transformer.device
    if world.device.type == "cuda" and device != world.device:
        raise ConfigError(
            f"rank {world.rank}'s transformer is on {device}, this rank's GPU is {world.device} (cuda:LOCAL_RANK); "
            f"build each rank's pipeline on its own GPU: FluxEngine.from_pretrained(..., device='{world.device}') "
            "or pipe.to(f'cuda:{LOCAL_RANK}')"
        )


def apply_parallel(pipe, config: ParallelConfig, ops) -> ParallelState | None:
    """Run `pipe` context-parallel on the process group torchrun started (joined here if need be). `ops`: the
    BlockOps that optimize()'s attention step installed on every block (context parallelism runs through the
    engine's blocks, so that the attention call is ours to split). None when config is off."""
    if not config.enabled:
        return None
    if ops is None:
        raise ConfigError("a parallel config needs the engine's attention blocks (optimize() installs them)")
    world = init_distributed(config.degree, config.timeout_s, pipe.transformer.device)
    check_rank_device(pipe.transformer, world)
    # the exchange's groups wait as long as the default group does (timeout_s, or the launcher's own timeout)
    timeout_s = world.timeout_s if world.timeout_s is not None else config.timeout_s
    shards = SequenceShards.create(
        world.rank, config.ulysses, config.ring, config.chunks, timeout_s, high_priority=config.comm_priority == "high"
    )
    shards_id = register_shards(shards)
    state = ParallelState(config, world, shards, shards_id, ops)
    heads = pipe.transformer.config.num_attention_heads
    groups = shards.grouped_layout(heads) if config.ulysses > 1 and heads % config.ulysses == 0 else None
    parallel_ops = replace(_same_core_everywhere(ops, world), shards_id=shards_id, exchange_groups=groups)
    for block in (*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks):
        block.flux_ops = parallel_ops
    install_split(pipe.transformer, shards, world)
    for name in _WRAPPED:
        if name in pipe.__dict__:
            state._shadowed[name] = pipe.__dict__[name]
    pipe.encode_prompt = functools.partial(_encode_once, pipe.encode_prompt, world)
    pipe.prepare_latents = functools.partial(_same_latents, pipe.prepare_latents, world)
    vae_state = getattr(pipe, "vae_state", None)
    if vae_state is not None:
        vae_state.world = world
    if not world.is_main:  # one progress bar per job, not one per GPU
        state.progress_bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
        pipe.set_progress_bar_config(disable=True)
    before_destroy(functools.partial(release_cuda_graphs, weakref.ref(pipe)))
    return state


def release_cuda_graphs(pipe_ref) -> None:
    """Drop the CUDA graphs captured on a (weakly referenced) pipeline: they hold NCCL resources that the
    communicator's destruction waits for; they are captured again on the next call."""
    pipe = pipe_ref()
    if pipe is not None:
        drop_captured_graphs(pipe)


def _same_core_everywhere(ops, world: World):
    """`ops` with rank 0's attention core: backend 'auto' times the cores on each rank, and ranks that chose
    differently would attend with different rounding per head group (an image that depends on the rank layout)."""
    cores = ("sdpa", "triton")
    if ops.core not in cores:
        raise ConfigError(
            f"attention backend {ops.core!r} is not supported with a parallel config yet (its quantised q and k "
            "carry scales the token exchange does not move: per token for 'triton-fp8', per tensor and rank for "
            f"'cudnn-fp8'); use backend 'auto' or one of {cores} under parallel"
        )
    choice = torch.tensor([cores.index(ops.core)], device=world.comm_device)
    dist.broadcast(choice, 0)
    core = cores[int(choice)]
    if core == ops.core:
        return ops
    from ..block_ops import BlockOps

    return BlockOps.build(core, ops.fused_norms)


def remove_parallel(pipe, state: ParallelState) -> None:
    """Undo apply_parallel (the process group stays: it is the launcher's)."""
    remove_split(pipe.transformer)
    for block in (*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks):
        block.flux_ops = state.ops_before
    for name in _WRAPPED:
        if name in state._shadowed:
            setattr(pipe, name, state._shadowed[name])
        elif name in pipe.__dict__:
            delattr(pipe, name)
    vae_state = getattr(pipe, "vae_state", None)
    if vae_state is not None:
        vae_state.world = None
    if state.progress_bar_config is not None:
        pipe._progress_bar_config = state.progress_bar_config
    unregister_shards(state.shards_id)
    state.shards.destroy()


def _encode_once(encode_prompt, world: World, *args, **kwargs):
    """The text encoders on rank 0; (prompt_embeds, pooled_prompt_embeds, text_ids) broadcast to the others."""
    outputs = encode_prompt(*args, **kwargs) if world.is_main else (None, None, None)
    return tuple(broadcast_tensor(tensor, world) for tensor in outputs)


def _same_latents(prepare_latents, world: World, *args, **kwargs):
    """Rank 0's initial latents on every rank (their shapes checked first: a rank called with another size or batch
    gets an InputError here rather than a collective that never completes)."""
    latents, image_ids = prepare_latents(*args, **kwargs)  # [B, L_image, C], [L_image, 3]
    check_same_everywhere("latent shapes (batch, tokens, channels)", tuple(latents.shape), world)
    shared = latents.to(world.comm_device).contiguous()
    dist.broadcast(shared, 0)
    return shared.to(latents.device), image_ids


def with_parallel(config, gpus: int, **changes):
    """`config` (an EngineConfig) run on `gpus` GPUs: parallel_for(gpus) (with the ParallelConfig fields in `changes`
    that are not None: chunks=4, comm_priority="high"), and,
    if the config does not tile the VAE, tiling 'auto' (1024-px tiles) so that the decode of a large image is shared
    by the ranks too. A named config keeps its name, with what was added."""
    from ..config import VaeConfig
    from .config import parallel_for

    parallel = replace(parallel_for(gpus), **{name: value for name, value in changes.items() if value is not None})
    if not parallel.enabled:
        return config
    vae = config.vae if config.vae.tiling != "off" else VaeConfig(tiling="auto")
    added = [part.label for part, before in ((vae, config.vae), (parallel, None)) if part != before]
    name = "+".join([config.name, *added]) if config.name else ""
    return replace(config, parallel=parallel, vae=vae, name=name)


def synchronize(world: World) -> None:
    """A barrier (and, on GPUs, the device's work finished), for timing all ranks together."""
    if world.device.type == "cuda":
        torch.cuda.synchronize(world.device)
    dist.barrier()
