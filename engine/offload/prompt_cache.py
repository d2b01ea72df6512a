"""The prompt-embedding cache: encode_prompt's results kept per prompt, so a repeated prompt skips the text encoders
(a speed feature of its own, used by the offload policies that move the encoders off the GPU)."""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict

import torch

logger = logging.getLogger(__name__)

ENCODER_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def encoders_fingerprint(pipe) -> tuple | None:
    """What the prompt embeddings are computed from: each text encoder and tokenizer (which object), and each of the
    encoders' tensors (which tensor, where its data lives, its in-place version counter). None when an encoder
    carries PEFT adapters, whose active set and scales live outside the weights: nothing is cached then."""
    parts = []
    for name in ENCODER_PARTS:
        part = getattr(pipe, name, None)
        parts.append(_Same(part))
        if not isinstance(part, torch.nn.Module):
            continue
        for module in part.modules():
            if hasattr(module, "lora_A"):  # PEFT's LoRA layers (load_lora_weights on a text encoder)
                return None
            for tensor in (*module._parameters.values(), *module._buffers.values()):
                if tensor is not None:
                    parts.append((_Same(tensor), tensor.data_ptr(), tensor._version))
    return tuple(parts)


class _Same:
    """Equal to another only for the very same object, while it lives (a weak reference: a cached fingerprint keeps
    no encoder alive, and a new object at a freed one's address is not taken for it)."""

    def __init__(self, obj):
        try:
            self.ref = weakref.ref(obj)
        except TypeError:  # None, or a tokenizer without weak references
            self.ref, self.obj = None, obj

    def get(self):
        return self.ref() if self.ref is not None else self.obj

    def __eq__(self, other) -> bool:
        if not isinstance(other, _Same):
            return False
        mine, theirs = self.get(), other.get()
        if mine is None:  # equal only as two absent parts (None), never as two freed objects
            return self.ref is None and other.ref is None and theirs is None
        return mine is theirs

    def __hash__(self) -> int:
        return id(self.get())

# ----------------------------------------------------------------------------- the prompt cache


def _copy(value):
    """The cache's own copy of encode_prompt's tensors, and a copy of it for each caller: an embedding the caller edits
    in place (a step callback's `prompt_embeds.mul_()`, code that scales encode_prompt's output) would otherwise be
    the cache's, and every later call with that prompt would get the edit (diffusers encodes each call anew)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple | list):
        return type(value)(_copy(item) for item in value)
    return value


class PromptCache:
    """The last `size` prompts' embeddings, so a repeated prompt does not bring the text encoders back."""

    KEY_ARGS = ("prompt", "prompt_2", "num_images_per_prompt", "max_sequence_length")

    def __init__(self, size: int):
        self.size = size
        self.entries: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.fingerprint: tuple | None = None  # the encoders the entries were computed with

    def clear(self) -> None:
        """Forget every prompt: after an edit the fingerprint cannot see (an encoder weight changed through `.data`,
        which bumps no version counter)."""
        self.entries.clear()

    def check_encoders(self, fingerprint: tuple | None) -> None:
        """Drop every entry when the encoders changed since they were computed (a swapped encoder or tokenizer, new
        weights loaded or edited in place, a tensor replaced): the old embeddings would be another model's."""
        if fingerprint is None or fingerprint != self.fingerprint:
            self.entries.clear()
        self.fingerprint = fingerprint

    @staticmethod
    def _freeze(value):
        return tuple(value) if isinstance(value, list) else value

    def key(self, arguments: dict, device, dtype):
        if arguments.get("prompt_embeds") is not None or arguments.get("lora_scale") is not None:
            return None  # the caller's own embeddings, or LoRA-scaled encoders: nothing to reuse
        if self.fingerprint is None:
            return None  # encoders with PEFT adapters (check_encoders)
        return tuple(self._freeze(arguments.get(name)) for name in self.KEY_ARGS) + (str(device), dtype)

    def get(self, key):
        if key is None or self.size == 0 or key not in self.entries:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return _copy(self.entries[key])

    def put(self, key, value) -> None:
        if key is None or self.size == 0:
            return
        self.entries[key] = _copy(value)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
