"""The optimisation steps that optimize() applied to a pipeline, by name, each with its undo.

`pipe.engine_steps` lists them in the order they were applied (`names()`); `engine.restore(pipe)` undoes all of
them, newest first, and leaves plain diffusers behind. A step that cannot give back what it replaced (quantised
weights: the originals are gone, and with them an offload that placed them) says so when it is applied, and undoing
it raises a ConfigError before anything is changed, naming the fix (load the pipeline again).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import ConfigError


@dataclass
class Step:
    name: str
    undo: Callable[[], None] | None  # None: cannot be undone, see why_not
    why_not: str = ""


class AppliedSteps:
    """The steps applied to one pipeline, oldest first."""

    def __init__(self) -> None:
        self._steps: list[Step] = []

    def add(self, name: str, undo: Callable[[], None] | None, why_not: str = "") -> None:
        if undo is None and not why_not:
            raise ValueError(f"step {name!r} without an undo must say why")
        self._steps.append(Step(name, undo, why_not))

    def names(self) -> list[str]:
        return [step.name for step in self._steps]

    def __iter__(self):
        return iter(list(self._steps))

    def __len__(self) -> int:
        return len(self._steps)

    def check_undoable(self) -> None:
        stuck = [step for step in self._steps if step.undo is None]
        if stuck:
            reasons = "; ".join(f"{step.name}: {step.why_not}" for step in stuck)
            raise ConfigError(
                f"the pipeline cannot be restored to diffusers' own ({reasons}); load it again, then optimise it "
                "with another config"
            )

    def undo_all(self) -> None:
        """Undo every step, newest first; nothing is changed unless every step can be undone."""
        self.check_undoable()
        while self._steps:
            self._steps.pop().undo()
