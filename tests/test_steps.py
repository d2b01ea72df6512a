"""optimize()'s steps are listed on the pipeline and undone by engine.restore: diffusers' exact images come back."""

import pytest
import torch
from conftest import tiny_call_kwargs
from diffusers import FluxPipeline
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

from engine import EngineConfig, FluxEngine, restore
from engine.config import AttentionConfig, CompileConfig, QuantConfig, VaeConfig
from engine.errors import ConfigError
from engine.models import synthetic_components


def _fresh_pipeline() -> FluxPipeline:
    return FluxPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0))


@pytest.fixture(scope="module")
def diffusers_images():
    return _fresh_pipeline()(**tiny_call_kwargs()).images


def test_every_step_is_listed_and_restore_gives_diffusers_images_back(diffusers_images):
    config = EngineConfig(
        attention=AttentionConfig(backend="sdpa", fused_norms=True),  # fused QKV + our kernels (interpreted here)
        vae=VaeConfig(tiling="on", tile=128, overlap=16),
        compile=CompileConfig(mode="regional", backend="eager"),
    )
    engine = FluxEngine.from_pipe(_fresh_pipeline(), config)
    assert engine.engine_steps.names() == ["attention", "vae", "compile", "joint-attention-kwargs", "lora"]
    optimised = engine(**tiny_call_kwargs()).images
    assert not torch.equal(optimised, diffusers_images)  # the steps did change the computation

    restore(engine)
    transformer = engine.transformer
    assert {type(b) for b in transformer.transformer_blocks} == {FluxTransformerBlock}
    assert {type(b) for b in transformer.single_transformer_blocks} == {FluxSingleTransformerBlock}
    assert not any(hasattr(b, name) for b in transformer.transformer_blocks for name in ("qkv", "txt_qkv", "flux_ops"))
    assert all(m._compiled_call_impl is None for m in transformer.modules())
    assert not transformer._forward_hooks and not transformer._forward_pre_hooks
    assert "_decode" not in vars(engine.vae) and engine.engine_steps is None and engine.engine_config.is_baseline
    # every projection owns its weights again (no view of a fused weight left behind)
    q = transformer.transformer_blocks[0].attn.to_q.weight
    assert q._base is None
    assert torch.equal(engine(**tiny_call_kwargs()).images, diffusers_images)


@pytest.mark.parametrize("policy", ["model", "block", "leaf"])
def test_offload_is_undone_too(policy, diffusers_images):
    from engine.config import OffloadConfig
    from engine.offload import StreamedModuleList

    config = EngineConfig(attention=AttentionConfig(backend="sdpa", fused_norms=True), offload=OffloadConfig(policy))
    engine = FluxEngine.from_pipe(_fresh_pipeline(), config)
    assert engine.engine_steps.names() == ["attention", "offload", "joint-attention-kwargs", "lora"]
    engine(**tiny_call_kwargs())  # streamed once
    restore(engine)
    transformer = engine.transformer
    assert not isinstance(transformer.transformer_blocks, StreamedModuleList)
    assert "encode_prompt" not in vars(engine)  # diffusers' own method, no prompt cache
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in transformer.modules())
    assert torch.equal(engine(**tiny_call_kwargs()).images, diffusers_images)


def test_a_step_that_cannot_be_undone_stops_restore_before_any_change():
    config = EngineConfig(
        attention=AttentionConfig(backend="sdpa", fused_norms=True), quant=QuantConfig(transformer="fp8")
    )
    engine = FluxEngine.from_pipe(_fresh_pipeline(), config)
    assert engine.engine_steps.names() == ["attention", "quantization", "joint-attention-kwargs", "lora"]
    with pytest.raises(ConfigError, match=r"cannot be restored .*quantization: the original weights were replaced"):
        restore(engine)
    # nothing was undone: the fused blocks and the config are still there
    assert engine.engine_steps.names() == ["attention", "quantization", "joint-attention-kwargs", "lora"]
    assert hasattr(engine.transformer.transformer_blocks[0], "qkv")
    assert engine.engine_config == config
