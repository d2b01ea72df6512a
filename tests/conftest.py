"""Test-wide setup.

Triton decides between compiled and interpreted kernels when a kernel is decorated, so the
interpreter switch must be set before anything imports `kernels`: without CUDA every Triton
kernel runs under TRITON_INTERPRET=1 on CPU tensors.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def _triton_interpreter_fixes():
    """Without CUDA the kernels run in Triton's interpreter, whose bugs flux_kernels.interpreter_fixes works around
    for the whole session (and undoes after it)."""
    if HAS_CUDA:
        yield
        return
    import flux_kernels

    with flux_kernels.interpreter_fixes():
        yield


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


TINY_SIZE = 64  # pixels: 4x4 latent patches, the smallest image with a 2x2 patch grid per side


@pytest.fixture(scope="session")
def tiny_components():
    """The tiny synthetic FLUX pipeline's components, fp32 on the CPU, seed 0. Treat as read-only."""
    from engine.models import synthetic_components

    return synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)


def tiny_call_kwargs(**overrides) -> dict:
    """Arguments of a fast, deterministic tiny pipeline call."""
    kwargs = {
        "prompt": "a red fox in the snow",
        "height": TINY_SIZE,
        "width": TINY_SIZE,
        "num_inference_steps": 2,
        "guidance_scale": 3.5,
        "generator": torch.Generator().manual_seed(0),
        "max_sequence_length": 32,
        "output_type": "pt",
    }
    kwargs.update(overrides)
    return kwargs
