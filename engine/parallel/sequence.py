"""The transformer under context parallelism: its inputs split across the ranks on the way in, its output gathered
on the way out, as a diffusers ModelHook (named, removable: the HookRegistry diffusers' own context parallelism
uses).

Why not diffusers' own `enable_parallelism` hooks (diffusers 0.42): its equal split asserts that every length
divides by the rank count (4080 image tokens of a 1360x768 image do not divide by 8), and its "anything" variant
learns the other ranks' lengths with an all-gather and `.item()` in every gather and every attention call: a host
synchronisation each time, which a CUDA graph cannot capture. Here every rank computes all shares' lengths from the
full input it was given (torch.tensor_split's rule, `split_sizes`), so nothing is asked of the other ranks.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook

from ..errors import InputError
from .exchange import SequenceShards, split_sizes
from .runtime import World

HOOK_NAME = "flux_engine_context_parallel"
# the forward arguments split along the sequence: (name, dimension of the tokens)
_SPLIT = (("hidden_states", 1), ("encoder_hidden_states", 1), ("img_ids", 0), ("txt_ids", 0))


class SplitSequenceHook(ModelHook):
    """Before the transformer: this rank's share of the image and text tokens (and their position ids, so RoPE is
    computed for its own tokens); after it: every rank's share of the output, gathered in token order."""

    def __init__(self, shards: SequenceShards, world: World):
        super().__init__()
        self.shards = shards
        self.world = world
        self.image_lengths: list[int] = []
        self._parameters: list[str] = []

    def initialize_hook(self, module):
        forward = type(module).forward
        self._parameters = list(inspect.signature(forward).parameters)[1:]  # without self
        return module

    def pre_forward(self, module, *args, **kwargs):
        kwargs = {**dict(zip(self._parameters, args, strict=False)), **kwargs}
        if kwargs.get("controlnet_block_samples") is not None or kwargs.get("controlnet_single_block_samples"):
            raise InputError(
                "ControlNet residuals are not split across ranks yet; run the ControlNet pipeline without a "
                "parallel config"
            )
        hidden, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        image_tokens, text_tokens = hidden.shape[1], text.shape[1]
        ranks = self.world.size
        if min(image_tokens, text_tokens) < ranks:
            raise InputError(
                f"{image_tokens} image and {text_tokens} text tokens cannot be shared by {ranks} ranks (each needs at "
                "least one of each); use a larger image or fewer GPUs"
            )
        self.image_lengths = split_sizes(image_tokens, ranks)
        text_lengths = split_sizes(text_tokens, ranks)
        self.shards.lengths = [i + t for i, t in zip(self.image_lengths, text_lengths, strict=True)]
        for name, dim in _SPLIT:
            value = kwargs.get(name)
            if value is not None:
                if value.ndim == 3 and name.endswith("_ids"):  # diffusers' deprecated batched ids
                    value, dim = value[0], 0
                kwargs[name] = value.tensor_split(ranks, dim=dim)[self.world.rank]
        return (), kwargs

    def post_forward(self, module, output):
        if isinstance(output, tuple):
            return (self._gather(output[0]), *output[1:])
        output.sample = self._gather(output.sample)
        return output

    def _gather(self, share: torch.Tensor) -> torch.Tensor:
        """[B, L_image_share, C] on each rank -> [B, L_image, C] on every rank (shares padded to the longest for the
        all-gather, the padding dropped)."""
        longest = max(self.image_lengths)
        padded = share
        if share.shape[1] < longest:
            padded = torch.nn.functional.pad(share, (0, 0, 0, longest - share.shape[1]))
        padded = padded.contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.world.size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:, :length] for part, length in zip(parts, self.image_lengths, strict=True)], dim=1)


def install_split(transformer, shards: SequenceShards, world: World) -> SplitSequenceHook:
    hook = SplitSequenceHook(shards, world)
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(hook, HOOK_NAME)
    return hook


def remove_split(transformer) -> None:
    HookRegistry.check_if_exists_or_initialize(transformer).remove_hook(HOOK_NAME, recurse=False)
