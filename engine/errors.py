"""The project's exception types. Each message names the bad value, what is allowed, and the fix."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error flux-engine raises on purpose."""


class ConfigError(EngineError, ValueError):
    """An EngineConfig, preset or command-line value is not valid."""


class ResolutionError(EngineError, ValueError):
    """A height or width the model cannot take."""


class VariantError(EngineError, ValueError):
    """An unknown model variant name."""


class CheckpointError(EngineError, OSError):
    """A local checkpoint is missing, unreadable, truncated or holds the wrong tensors."""


class InputError(EngineError, ValueError):
    """A pipeline call argument that diffusers would only reject deep inside the model."""


class ParallelError(EngineError, RuntimeError):
    """A rank of a context-parallel run failed, hung past the timeout, or was called differently from the others."""


def __getattr__(name: str):
    """EngineOutOfMemoryError subclasses torch.OutOfMemoryError, so it is made on first use: importing this module
    (every command does, before parsing its arguments) must not import torch."""
    if name != "EngineOutOfMemoryError":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import torch

    class EngineOutOfMemoryError(EngineError, torch.OutOfMemoryError):
        """A call ran out of GPU memory; the message names a config predicted to fit. Still a torch
        OutOfMemoryError, so existing handlers catch it."""

    EngineOutOfMemoryError.__qualname__ = name
    globals()[name] = EngineOutOfMemoryError
    return EngineOutOfMemoryError
