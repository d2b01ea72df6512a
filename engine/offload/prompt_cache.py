"""The prompt-embedding cache: encode_prompt's results kept per prompt, so a repeated prompt skips the text encoders
(a speed feature of its own, used by the offload policies that move the encoders off the GPU)."""

from __future__ import annotations

import logging
from collections import OrderedDict

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- the prompt cache


class PromptCache:
    """The last `size` prompts' embeddings, so a repeated prompt does not bring the text encoders back."""

    KEY_ARGS = ("prompt", "prompt_2", "num_images_per_prompt", "max_sequence_length")

    def __init__(self, size: int):
        self.size = size
        self.entries: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _freeze(value):
        return tuple(value) if isinstance(value, list) else value

    def key(self, arguments: dict, device, dtype):
        if arguments.get("prompt_embeds") is not None or arguments.get("lora_scale") is not None:
            return None  # the caller's own embeddings, or LoRA-scaled encoders: nothing to reuse
        return tuple(self._freeze(arguments.get(name)) for name in self.KEY_ARGS) + (str(device), dtype)

    def get(self, key):
        if key is None or self.size == 0 or key not in self.entries:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return self.entries[key]

    def put(self, key, value) -> None:
        if key is None or self.size == 0:
            return
        self.entries[key] = value
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
