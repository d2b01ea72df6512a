"""First-Block Cache under CUDA graphs: the blocks after the decider (the second block) captured as one CUDA graph
per input signature, replayed on full steps.

A whole-forward graph cannot branch after the first block, so First-Block Cache ran its 57 compiled blocks one
launch at a time, and a full step cost ~6% more than the uncached config, mostly on the host (NOTES, 2026-11-30
01:52). Here the first two blocks run as launched (the first block's residual decides; the second is launched
before the host reads the decision), and on a full step the other 55 blocks replay as one graph.

The blocks are called one by one by diffusers' loop, so the capture spans calls: it begins at the first block
after the decider and ends after the last block. While it runs, every tensor the blocks read that changes from
step to step (the segment's hidden states, temb, the rotary tables) is swapped for a static copy, and each block's
outputs are kept; a replay copies the step's tensors into the static ones, replays, and hands each block's kept
outputs to diffusers' loop in turn. As with the whole-forward graphs, a signature's first full step runs eagerly
(the warm-up: compiling, tuning, lazy initialisation), its next one captures.
"""

from __future__ import annotations

import contextlib

import torch

from ..cuda_graphs import WeightWatch, global_state

_CHANGING = ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb")


def _tensors(kwargs: dict) -> list[torch.Tensor]:
    """The tensors of the kwargs that change from step to step, in a fixed order (the rotary tables flattened)."""
    found = []
    for name in _CHANGING:
        value = kwargs.get(name)
        found += list(value) if isinstance(value, (tuple, list)) else [value] if value is not None else []
    return found


def _swap(value, static: dict):
    if isinstance(value, torch.Tensor):
        return static.get(id(value), value)
    if isinstance(value, tuple):
        return tuple(_swap(item, static) for item in value)
    return value


class _Graph:
    def __init__(self, inputs: list[torch.Tensor]):
        self.graph = torch.cuda.CUDAGraph()
        self.inputs = [tensor.clone() for tensor in inputs]  # the graph reads these; a replay copies into them
        self.outputs: list[tuple] = []  # each block's (text, image), written by every replay
        self.static: dict[int, torch.Tensor] = {}  # id of a tensor of the capturing step -> its static copy


class TailGraphs:
    """The segment of blocks after the decider as one CUDA graph per signature (see the module docstring).

    `length`: the blocks in the segment. A full step calls `first` for its first block, then `next` for each other
    one in order; `first`'s `usable` says whether this step can take the graph at all (see `usable`).
    """

    def __init__(self, length: int, transformer: torch.nn.Module, max_graphs: int = 4):
        self.length = length
        self.transformer = transformer
        self.watch = WeightWatch()  # the weights' addresses at the capture (engine.cuda_graphs)
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, _Graph] = {}
        self.warmed: set[tuple] = set()
        self.captures = 0
        self._mode: str | None = None  # this step's: 'eager', 'capture' or 'replay'
        self._current: _Graph | None = None
        self._capture_context = None
        self._key: tuple | None = None

    @staticmethod
    def usable(kwargs: dict, forward_kwargs_plain: bool) -> bool:
        """A CUDA transformer, no autograd, no attention kwargs inside the blocks, and (`forward_kwargs_plain`)
        nothing in the transformer's call that a graph would bake in (ControlNet residuals, a LoRA scale); not
        inside another capture."""
        hidden = kwargs.get("hidden_states")
        return (
            forward_kwargs_plain
            and hidden is not None
            and hidden.is_cuda
            and not torch.is_grad_enabled()
            and not kwargs.get("joint_attention_kwargs")
            and not torch.cuda.is_current_stream_capturing()
        )

    def clear(self) -> None:
        """Forget every graph and warm-up (after the modules changed: adapters, a dynamo reset)."""
        self.graphs.clear()
        self.warmed.clear()

    def first(self, block, kwargs: dict, usable: bool):
        if not usable:
            self._mode = "eager"
            return self._eager(block, kwargs, 0)
        if self.graphs and self.watch.moved():  # the weights the graphs read are gone: warm up and capture again
            self.clear()
        tensors = _tensors(kwargs)
        key = (*((tuple(t.shape), t.dtype) for t in tensors), global_state())  # autocast, SDPA / matmul switches
        entry = self.graphs.get(key)
        if entry is not None:
            for static, value in zip(entry.inputs, tensors, strict=True):
                static.copy_(value, non_blocking=True)
            entry.graph.replay()
            self._mode, self._current = "replay", entry
            return entry.outputs[0]
        if key not in self.warmed:
            self.warmed.add(key)
            self._mode = "eager"
            return self._eager(block, kwargs, 0)
        if len(self.graphs) >= self.max_graphs:
            self.graphs.pop(next(iter(self.graphs)))
        entry = _Graph(tensors)
        entry.static = {id(value): static for value, static in zip(tensors, entry.inputs, strict=True)}
        self._mode, self._current, self._key = "capture", entry, key
        self._capture_context = torch.cuda.graph(entry.graph)
        self._capture_context.__enter__()
        return self._captured(block, kwargs, 0)

    def next(self, block, kwargs: dict, index: int):
        if self._mode == "replay":
            return self._current.outputs[index]
        if self._mode == "capture":
            return self._captured(block, kwargs, index)
        return self._eager(block, kwargs, index)

    def _eager(self, block, kwargs: dict, index: int):
        output = block(**kwargs)
        if index == self.length - 1:
            self._mode = None
        return output

    def _captured(self, block, kwargs: dict, index: int):
        entry = self._current
        try:
            output = block(**{name: _swap(value, entry.static) for name, value in kwargs.items()})
        except BaseException:
            self._abort()
            raise
        entry.outputs.append(output)
        if index == self.length - 1:
            self._capture_context.__exit__(None, None, None)
            self._capture_context, entry.static = None, {}
            self.graphs[self._key] = entry
            self.captures += 1
            self.note_capture()
            entry.graph.replay()  # a capture records without running: this step's values come from the replay
            self._mode = "replay"
        return output

    def note_capture(self) -> None:
        """What the graphs read, noted at a capture: the transformer's weights and processors, and the hooks of the
        segment's blocks only (the first two blocks and the transformer's own hooks run outside the graphs, at every
        step: a hook added there is no reason to capture again)."""
        blocks = [*self.transformer.transformer_blocks._modules.values(),
                  *self.transformer.single_transformer_blocks._modules.values()]  # fmt: skip
        self.watch.note(self.transformer, captured=blocks[len(blocks) - self.length :])

    def _abort(self) -> None:
        """A block failed during the capture: end it (its graph is dropped) so the stream is usable again."""
        context, self._capture_context, self._mode = self._capture_context, None, None
        if context is not None:
            with contextlib.suppress(Exception):  # the block's own error is the one to report
                context.__exit__(None, None, None)
