"""State a captured CUDA graph (or a compiled region) bakes in, changed between calls through diffusers', PEFT's and
torch's own APIs: the LoRA scale of one call, the transformer's adapter switches, torch hooks inside, diffusers'
attention processors, autocast and the SDPA switches, diffusers' layerwise casting. Each was replayed stale on an
H200 before (benchmarks/probe_graph_state.py, NOTES 2026-12-03 15:25). The CPU cannot capture graphs: its tests check
what the graphs read (the scale tensors, the watch's view of the modules); the GPU tests the images.
"""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import tiny_call_kwargs
from diffusers import FluxPipeline

from engine import EngineConfig, FluxEngine
from engine.config import AttentionConfig, CompileConfig
from engine.cuda_graphs import WeightWatch, drop_captured_graphs
from engine.errors import ConfigError
from engine.lora import is_lora_layer, synthetic_lora
from engine.models import synthetic_components

FUSED = EngineConfig(attention=AttentionConfig(backend="auto"))
COMPILED = EngineConfig(attention=AttentionConfig(backend="auto"), compile=CompileConfig("regional", backend="eager"))
# fp32 tiny model, fused GEMMs against diffusers' split ones: within 1e-6 measured (tests/test_lora.py's ATOL)
ATOL = 1e-5
# on the GPU the fused GEMMs round apart from diffusers' split ones by up to 2.3e-5 (H200, fp32), and the compiled
# kernels from eager ones by 2.0e-5 (tests/test_lora.py's gpu_atol); the stale replays below were 0.09-1.0 away
GPU_ATOL = 1e-3


def _pipe(device="cpu", dtype=torch.float32) -> FluxPipeline:
    return FluxPipeline(**synthetic_components("tiny", device=device, dtype=dtype, seed=0))


def _engine(config, device="cpu", dtype=torch.float32):
    return FluxEngine.from_pipe(_pipe(device, dtype), config)


def _image(pipe, **overrides) -> torch.Tensor:
    return pipe(**tiny_call_kwargs(**overrides)).images.float()


@pytest.fixture(scope="module")
def adapters():
    transformer = synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)["transformer"]
    return synthetic_lora(transformer, 4, seed=1, std=0.1), synthetic_lora(transformer, 4, seed=2, std=0.1)


def _scales(transformer) -> list:
    return [(m, name, value) for m in transformer.modules() if is_lora_layer(m) for name, value in m.scaling.items()]


def test_a_scaled_call_leaves_the_scale_tensors_the_graphs_read_at_the_adapters_scale(adapters):
    """diffusers scales a call's adapters with PEFT's scale_layer (in place on the compiled blocks' scale tensors) and
    undoes it with unscale_layer, which writes a NEW tensor: the graphs kept reading the old one at 0.5x (an H200's
    next plain call ran the adapter at half strength). The tensors stay the same objects, at the adapter's scale."""
    reference, engine = _pipe(), _engine(COMPILED)
    for pipe in (reference, engine):
        pipe.load_lora_weights(dict(adapters[0]), adapter_name="a")
        pipe.set_adapters(["a"], [0.8])
    _image(engine)
    kept = {(id(layer), name): tensor for layer, name, tensor in _scales(engine.transformer)}
    assert kept and all(isinstance(tensor, torch.Tensor) for tensor in kept.values())
    for scale in (0.5, 1.7, 0.0):  # 0: diffusers then resets every scale to lora_alpha / r (set_adapters' 0.8 gone)
        scaled = {"joint_attention_kwargs": {"scale": scale}}
        torch.testing.assert_close(_image(engine, **scaled), _image(reference, **scaled), atol=ATOL, rtol=0)
        expected = [float(value) for _, _, value in _scales(reference.transformer)]
        now = _scales(engine.transformer)
        assert [float(value) for _, _, value in now] == pytest.approx(expected, rel=1e-12), scale
        assert all(value is kept[id(layer), name] for layer, name, value in now), scale
        torch.testing.assert_close(_image(engine), _image(reference), atol=ATOL, rtol=0)


@pytest.mark.parametrize("switch", ["transformer.disable_adapters", "layer.enable_adapters(False)"])
def test_adapters_disabled_on_the_transformer_leave_no_merged_weights(adapters, switch):
    """A fused adapter disabled through the transformer's own method (diffusers' PeftAdapterMixin) or a PEFT layer's:
    PEFT's forward would unmerge it, the fused blocks never run that forward, so the merged weights kept making the
    adapter's image (diffusers' is without it). Disabling settles it before the next forward, as the pipeline's
    disable_lora did."""
    reference, engine = _pipe(), _engine(FUSED)
    for pipe in (reference, engine):
        pipe.load_lora_weights(dict(adapters[0]), adapter_name="a")
        pipe.fuse_lora()
        if switch == "transformer.disable_adapters":
            pipe.transformer.disable_adapters()
        else:
            for module in pipe.transformer.modules():
                if is_lora_layer(module):
                    module.enable_adapters(False)
    without = _image(_pipe())
    torch.testing.assert_close(_image(reference), without, atol=ATOL, rtol=0)  # diffusers: the base image
    torch.testing.assert_close(_image(engine), without, atol=ATOL, rtol=0)


def test_the_weight_watch_sees_hooks_and_processors_changed_inside():
    """What a capture read besides the weights: torch hooks inside the transformer (run only while capturing) and
    diffusers' attention processors (read inside the forward)."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    transformer = _pipe().transformer
    watch = WeightWatch()
    watch.note(transformer)
    assert not watch.moved()
    handle = transformer.transformer_blocks[0].register_forward_hook(lambda module, args, out: out)
    assert watch.moved()
    handle.remove()
    assert not watch.moved()
    elsewhere = torch.nn.Linear(2, 2).register_forward_hook(lambda module, args, out: out)
    assert not watch.moved()  # a hook outside the transformer
    elsewhere.remove()
    handle = transformer.transformer_blocks[0].register_forward_hook(lambda module, args, out: out)
    watch.note(transformer)
    handle.remove()
    transformer.transformer_blocks[1].register_forward_hook(lambda module, args, out: out)
    assert watch.moved()  # one hook taken off, another put on: as many as at the capture, not the same
    watch.note(transformer)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: None)
    assert watch.moved()  # torch's global hooks run inside too
    hook.remove()
    transformer.set_attn_processor(FluxAttnProcessor())
    assert watch.moved()
    watch.note(transformer)
    transformer.set_attention_backend("native")
    assert watch.moved()


def test_fuse_lora_on_layers_quantised_outside_the_engine_is_refused():
    """A merge quantises the merged weights again, which the engine does in its own modes only (quanto's qint4 went
    through quanto's int8 path; bitsandbytes' fp4 was merged as nf4)."""
    from optimum import quanto

    pipe = _pipe()
    quanto.quantize(pipe.transformer.transformer_blocks[0].attn, weights=quanto.qint4, include="to_out.0")
    quanto.freeze(pipe.transformer)
    engine = FluxEngine.from_pipe(pipe, "baseline")
    with pytest.raises(ConfigError, match="quanto-qint4.*Keep the adapter unfused"):
        engine.fuse_lora()


def test_a_module_set_inside_a_compiled_region_recompiles_nothing_once_a_watch_is_gone():
    """torch's module-registration hook (the weight watch's) traced by dynamo guarded the region on the set of
    watches: a pipeline dropped (its watch gone) recompiled the next call of every region that sets a module."""
    module, holder = torch.nn.Linear(2, 2), torch.nn.Module()
    holder.extra = torch.nn.Identity()  # set before: the region replaces a module (a new name would recompile once)
    watch = WeightWatch()
    watch.note(module)
    compiles = []

    def backend(graph, example_inputs):
        compiles.append(1)
        return graph.forward

    @torch.compile(backend=backend)
    def region(x):
        holder.extra = torch.nn.Identity()
        return x * 2

    region(torch.ones(2))
    del watch
    gc.collect()
    region(torch.ones(2))
    assert len(compiles) == 1


def test_layerwise_casting_applied_inside_captured_blocks_is_refused():
    """diffusers' apply_layerwise_casting called directly (enable_layerwise_casting is refused): under the forward's
    CUDA graphs the replays read the capture's cast copies (NaN images on an H200)."""
    from diffusers.hooks import apply_layerwise_casting

    from engine.block_guards import _check_compiled_hooks

    transformer = _pipe().transformer
    _check_compiled_hooks(transformer, frames=None, graphs=True)  # nothing on it: passes
    apply_layerwise_casting(transformer, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with pytest.raises(ConfigError, match="apply_layerwise_casting.*cuda_graphs=False"):
        _check_compiled_hooks(transformer, frames=None, graphs=True)


# ---------------------------------------------------------------------------------------------------- on the GPU
GRAPHS = EngineConfig(attention=AttentionConfig(backend="auto"), compile=CompileConfig("regional", cuda_graphs=True))


def _captured(config, device="cuda"):
    engine = _engine(config, device)
    _image(engine)
    return engine, _image(engine)  # captured, and replayed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_a_plain_call_after_a_scaled_one_replays_the_adapters_scale_on_the_gpu(adapters):
    engine = _engine(GRAPHS, "cuda")
    engine.load_lora_weights(dict(adapters[0]), adapter_name="a")
    _image(engine)
    before = _image(engine)
    scaled = _image(engine, joint_attention_kwargs={"scale": 0.5})
    assert (scaled - before).abs().max() > 1e-2  # the scale does change the image
    torch.testing.assert_close(_image(engine), before, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_a_plain_call_after_a_scaled_one_on_uncompiled_hotswap_blocks_on_the_gpu(adapters):
    """Graphs over uncompiled blocks with PEFT's own scale tensors (enable_lora_hotswap): a scaled call's unscale put
    a new tensor in PEFT's dict, the graph kept reading the scaled one; the graphs are dropped now."""
    engine = _engine(EngineConfig(attention=AttentionConfig(backend="auto"), compile=CompileConfig("none",
                                                                                                   cuda_graphs=True)),
                     "cuda")  # fmt: skip
    engine.enable_lora_hotswap(target_rank=8)
    engine.load_lora_weights(dict(adapters[0]), adapter_name="a")
    _image(engine)
    before = _image(engine)
    scaled = _image(engine, joint_attention_kwargs={"scale": 0.5})
    assert (scaled - before).abs().max() > 1e-2
    for _ in range(3):
        torch.testing.assert_close(_image(engine), before, atol=GPU_ATOL, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("switch", ["disable_adapters", "set_adapter", "layer.set_scale"])
def test_adapter_switches_on_the_transformer_reach_the_captured_graphs_on_the_gpu(adapters, switch):
    """The transformer's own disable_adapters / set_adapter and a PEFT layer's set_scale after a capture: the replays
    kept the adapters of the capture. Against the fused engine uncompiled, given the same calls."""
    reference, engine = _engine(FUSED, "cuda"), _engine(GRAPHS, "cuda")
    for pipe in (reference, engine):
        pipe.load_lora_weights(dict(adapters[0]), adapter_name="a")
        pipe.load_lora_weights(dict(adapters[1]), adapter_name="b")
        pipe.set_adapters(["a"])
    _image(engine)
    before = _image(engine)  # captured, and replayed
    for pipe in (reference, engine):
        if switch == "layer.set_scale":
            for module in pipe.transformer.modules():
                if is_lora_layer(module):
                    module.set_scale("a", 0.25)
        else:
            getattr(pipe.transformer, switch)(*(["b"] if switch == "set_adapter" else []))
    expected = _image(reference)
    assert (expected - before).abs().max() > 1e-2
    for _ in range(3):  # eager again, captured again, replayed
        torch.testing.assert_close(_image(engine), expected, atol=GPU_ATOL, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_a_hook_added_inside_after_the_capture_acts_and_goes_on_the_gpu():
    engine, before = _captured(GRAPHS)
    handle = engine.transformer.transformer_blocks[0].register_forward_hook(lambda m, a, out: (out[0], out[1] * 0))
    hooked = [_image(engine) for _ in range(3)]  # eager again, captured again, replayed
    assert (hooked[0] - before).abs().max() > 0.1
    for image in hooked[1:]:
        torch.testing.assert_close(image, hooked[0], atol=GPU_ATOL, rtol=0)
    handle.remove()
    for _ in range(3):
        torch.testing.assert_close(_image(engine), before, atol=GPU_ATOL, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("switch", ["processor", "autocast", "sdpa-math", "attention_backend"])
def test_diffusers_blocks_under_graphs_follow_the_switches_of_a_call_on_the_gpu(switch):
    """Graphs over diffusers' own blocks (no compile): a processor set after the capture, an autocast, sdpa_kernel or
    diffusers' attention_backend() around a call. Each image against the same pipeline captured again under the
    switch (bf16: the switches move its image by 0.03-0.05, measured on an H200)."""
    import contextlib

    from diffusers.models.attention_dispatch import attention_backend
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    from torch.nn.attention import SDPBackend, sdpa_kernel

    class Halved(FluxAttnProcessor):
        def __call__(self, *args, **kwargs):
            out = super().__call__(*args, **kwargs)
            return tuple(o * 0.5 for o in out) if isinstance(out, tuple) else out * 0.5

    engine = _engine(EngineConfig(compile=CompileConfig("none", cuda_graphs=True)), "cuda", torch.bfloat16)
    _image(engine)
    before = _image(engine)
    context = {
        "processor": contextlib.nullcontext(),
        "autocast": torch.autocast("cuda", dtype=torch.float16),
        "sdpa-math": sdpa_kernel(SDPBackend.MATH),
        "attention_backend": attention_backend("_native_math"),
    }[switch]
    if switch == "processor":
        engine.transformer.set_attn_processor(Halved())
    with context:
        after = [_image(engine) for _ in range(3)]
        drop_captured_graphs(engine)
        _image(engine)
        expected = _image(engine)
    assert (expected - before).abs().max() > 1e-3
    for image in after:
        torch.testing.assert_close(image, expected, atol=1e-3, rtol=0)
