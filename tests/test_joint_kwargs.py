"""engine/joint_kwargs.py: `joint_attention_kwargs` that diffusers' attention modules drop (a key no processor takes)
give diffusers' image and diffusers' warning on compiled and fused blocks too; keys a processor takes reach it. Before:
on compiled blocks dynamo failed at diffusers' logger call ("logging.Logger methods are not supported"), and the
fused blocks refused every key. The reference is the plain diffusers pipeline with the same inputs (tiny model, fp32,
CPU; compiled regions through aot_eager)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import tiny_call_kwargs
from diffusers import FluxControlNetPipeline, FluxPipeline
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from engine import EngineConfig, optimize, restore
from engine.config import AttentionConfig, CompileConfig
from engine.errors import InputError
from engine.joint_kwargs import _sort_before_forward
from engine.models import synthetic_components, synthetic_controlnet

COMPILED = CompileConfig(mode="regional", backend="aot_eager")
CONFIGS = {
    "compiled-diffusers-blocks": EngineConfig(compile=COMPILED),
    "fused-blocks": EngineConfig(attention=AttentionConfig(backend="auto")),
    "fused-compiled-blocks": EngineConfig(attention=AttentionConfig(backend="auto"), compile=COMPILED),
}
WARNING = "joint_attention_kwargs ['foo'] are not expected by FluxAttnProcessor and will be ignored."


def _pipe() -> FluxPipeline:
    pipe = FluxPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Records(logging.Handler):
    """diffusers' loggers do not propagate to the root logger (pytest's caplog): a handler on diffusers' own."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def diffusers_warnings():
    logger = logging.getLogger("diffusers.models.transformers.transformer_flux")
    records = _Records()
    logger.addHandler(records)
    yield records.messages
    logger.removeHandler(records)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_key_no_processor_takes_is_dropped_with_diffusers_warning(name, diffusers_warnings):
    torch._dynamo.reset()
    given = {"foo": 1, "scale": 1.0}
    expected = _pipe()(**tiny_call_kwargs(joint_attention_kwargs=given)).images
    assert WARNING in diffusers_warnings  # what diffusers does: warn, and make its usual image
    torch.testing.assert_close(expected, _pipe()(**tiny_call_kwargs()).images, rtol=0, atol=0)
    diffusers_warnings.clear()
    pipe = optimize(_pipe(), CONFIGS[name])
    images = pipe(**tiny_call_kwargs(joint_attention_kwargs=given)).images
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
    assert diffusers_warnings and set(diffusers_warnings) == {WARNING}
    assert given == {"foo": 1, "scale": 1.0}  # the caller's dict as it was
    restore(pipe)
    assert _sort_before_forward not in pipe.transformer._forward_pre_hooks.values()


class _TakesFoo(FluxAttnProcessor):
    """A processor that takes a `foo` from joint_attention_kwargs (its output times foo)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 foo=1.0):  # fmt: skip
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return tuple(o * foo for o in out) if isinstance(out, tuple) else out * foo


def test_a_key_a_processor_takes_reaches_it_on_compiled_blocks(diffusers_warnings):
    torch._dynamo.reset()
    reference = _pipe()
    reference.transformer.set_attn_processor(_TakesFoo())
    call = tiny_call_kwargs(joint_attention_kwargs={"foo": 0.5})
    expected = reference(**call).images
    assert not torch.allclose(expected, _pipe()(**tiny_call_kwargs()).images, atol=1e-3)  # foo changes the image
    pipe = _pipe()
    pipe.transformer.set_attn_processor(_TakesFoo())
    optimize(pipe, CONFIGS["compiled-diffusers-blocks"])
    images = pipe(**tiny_call_kwargs(joint_attention_kwargs={"foo": 0.5})).images
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
    assert not diffusers_warnings


def test_a_key_only_some_processors_take_is_refused_before_the_blocks():
    """diffusers drops it for the other processors with a logger call, which fails inside the compiled blocks."""
    torch._dynamo.reset()
    pipe = _pipe()
    for block in pipe.transformer.transformer_blocks:
        block.attn.set_processor(_TakesFoo())
    optimize(pipe, CONFIGS["compiled-diffusers-blocks"])
    with pytest.raises(InputError, match=r"\['foo'\] are taken by some of the transformer's attention processors"):
        pipe(**tiny_call_kwargs(joint_attention_kwargs={"foo": 0.5}))


def test_a_controlnet_pipeline_drops_the_key_once_a_transformer_call(diffusers_warnings):
    """FluxControlNetPipeline passes joint_attention_kwargs to its ControlNet too, whose forward gives them to none of
    its blocks (diffusers'): the transformer's hook warns once a call (2 steps: 2 warnings), the ControlNet none."""
    import numpy as np
    from PIL import Image

    torch._dynamo.reset()

    def pipe():
        components = synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)
        made = FluxControlNetPipeline(
            **components, controlnet=synthetic_controlnet("tiny", dtype=torch.float32, seed=1)
        )
        made.set_progress_bar_config(disable=True)
        return made

    control = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    call = {"control_image": control, "controlnet_conditioning_scale": 0.7}
    expected = pipe()(**tiny_call_kwargs(**call)).images
    optimised = optimize(pipe(), CONFIGS["fused-compiled-blocks"])
    images = optimised(**tiny_call_kwargs(**call, joint_attention_kwargs={"foo": 1})).images
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
    assert diffusers_warnings == [WARNING] * 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="our kernels, fp8 and CUDA graphs need CUDA")
def test_the_fastest_preset_replays_its_cuda_graph_with_a_dropped_key(diffusers_warnings):
    """fp8-compile-fastacc-cudagraphs: a call with a key no processor takes is the call without it (the same bits,
    from the same captured graph: no eager fall-back, no new capture, no recompile)."""
    from engine import FluxEngine

    engine = FluxEngine.from_pretrained("synthetic:tiny", "fp8-compile-fastacc-cudagraphs", device="cuda")
    engine.set_progress_bar_config(disable=True)
    engine(**tiny_call_kwargs())  # warms the graph's size
    expected = engine(**tiny_call_kwargs()).images  # captures, then replays
    graphs = engine.compile_state.cuda_graphs
    captures, eager = graphs.captures, []
    forward = graphs.forward
    graphs.forward = lambda *args, **kwargs: eager.append(1) or forward(*args, **kwargs)  # the eager fall-back
    with torch._dynamo.config.patch(error_on_recompile=True):
        images = engine(**tiny_call_kwargs(joint_attention_kwargs={"foo": 1})).images
    assert torch.equal(images, expected)
    assert graphs.captures == captures and not eager
    assert set(diffusers_warnings) == {WARNING}
