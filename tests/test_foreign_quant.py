"""Transformers quantised by diffusers' or the libraries' own means (quanto's qint4 / qint8, part of the model only),
then optimize(): what the engine's fused blocks or quantisation cannot take is refused before anything changes. Before,
the refusal came from the first block that could not be fused, after the blocks before it were rewritten (restore()
could not undo them, a retry failed on their placeholders), or quanto's qint4 was taken for int8 (a crash inside
quanto at the fusing). A helper's probe of diffusers-quantised pipelines, 2026-12-03. Tiny model, CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_call_kwargs
from diffusers import FluxPipeline
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

from engine import EngineConfig, optimize, restore
from engine.config import AttentionConfig, QuantConfig
from engine.errors import ConfigError
from engine.models import synthetic_components

FUSED = EngineConfig(attention=AttentionConfig(backend="auto"))  # the fused blocks in PyTorch (no Triton on a CPU)


def _pipe() -> FluxPipeline:
    pipe = FluxPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _quanto(module, qtype: str, include: str | None = None) -> None:
    from optimum import quanto

    quanto.quantize(module, weights=getattr(quanto, qtype), include=include)
    quanto.freeze(module)


def _untouched(pipe) -> None:
    transformer = pipe.transformer
    assert all(type(block) is FluxTransformerBlock for block in transformer.transformer_blocks)
    assert all(type(block) is FluxSingleTransformerBlock for block in transformer.single_transformer_blocks)
    assert getattr(pipe, "engine_steps", None) is None


@pytest.mark.parametrize("case", ["qint4", "one to_q qint8", "qint8 then fp8"])
def test_what_the_fused_blocks_cannot_take_is_refused_before_any_block_changes(case):
    pipe = _pipe()
    expected = pipe(**tiny_call_kwargs()).images
    if case == "qint4":
        _quanto(pipe.transformer.transformer_blocks, "qint4")
        config, match = FUSED, "quanto-qint4.*Nothing was changed"
    elif case == "one to_q qint8":  # the last double block's: the blocks before were rewritten before the refusal
        _quanto(pipe.transformer.transformer_blocks[-1].attn, "qint8", include="to_q")
        config, match = FUSED, "Nothing was changed"
    else:
        _quanto(pipe.transformer, "qint8")
        config = EngineConfig(attention=AttentionConfig(backend="auto"), quant=QuantConfig(transformer="fp8"))
        match = "already quantised as 'int8-weight'"
    expected = pipe(**tiny_call_kwargs()).images
    with pytest.raises(ConfigError, match=match):
        optimize(pipe, config)
    _untouched(pipe)
    torch.testing.assert_close(pipe(**tiny_call_kwargs()).images, expected, atol=0, rtol=0)
    restore(pipe)
    optimize(pipe, "baseline")  # the pipeline is as it was: another config takes it


def test_quanto_qint4_is_not_taken_for_int8():
    from engine.quant.apply import quant_mode_of

    pipe = _pipe()
    _quanto(pipe.transformer, "qint4")
    assert quant_mode_of(pipe.transformer) == "quanto-qint4"
    with pytest.raises(ConfigError, match="already quantised as 'quanto-qint4'"):
        optimize(pipe, EngineConfig(quant=QuantConfig(transformer="int8-weight")))


def _bnb_nf4(module) -> None:
    """bitsandbytes' nf4 in place of the blocks' Linears, as diffusers' BitsAndBytesConfig lays them (it needs CUDA
    to quantise at load; bitsandbytes quantises on the CPU when a layer is moved there)."""
    import bitsandbytes as bnb

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, quant_type="nf4")  # fmt: skip
                layer.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    layer.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(parent, name, layer.to("cpu"))


def test_a_lora_on_bitsandbytes_nf4_layers_that_the_fused_blocks_fused():
    """Before: diffusers' width check read the fused parts' weights from the state dict (KeyError), and the pipeline
    was left without the adapter. The adapter now acts beside the quantised fused GEMMs, as on diffusers' blocks.
    (diffusers itself cannot load a LoRA on quanto's layers: the same KeyError on its own blocks.)"""
    from engine.lora import synthetic_lora
    from engine.measure import psnr

    def pipe():
        made = FluxPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.bfloat16, seed=0))
        blocks = [*made.transformer.transformer_blocks, *made.transformer.single_transformer_blocks]
        for block in blocks:
            _bnb_nf4(block)
        made.set_progress_bar_config(disable=True)
        return made

    plain = pipe()
    bare = plain(**tiny_call_kwargs()).images
    unquantised = synthetic_components("tiny", device="cpu", dtype=torch.bfloat16)["transformer"]
    lora = synthetic_lora(unquantised, 4, seed=1, strength=0.5)
    plain.load_lora_weights(dict(lora), adapter_name="style")
    expected = plain(**tiny_call_kwargs()).images
    ours = optimize(pipe(), FUSED)
    unadapted = ours(**tiny_call_kwargs()).images
    ours.load_lora_weights(dict(lora), adapter_name="style")
    # bf16 sums in the fused blocks' order against diffusers' (48-49 dB measured, with and without the adapter)
    assert psnr(bare, expected) < 45.0 <= psnr(ours(**tiny_call_kwargs()).images, expected)
    ours.unload_lora_weights()
    assert torch.equal(ours(**tiny_call_kwargs()).images, unadapted)


@pytest.mark.parametrize("kind", ["quanto-qint8", "bnb-nf4"])
def test_a_synthetic_lora_for_a_quantised_transformer_is_scaled_by_its_weights_not_its_codes(kind):
    """`engine.bench --lora synthetic:R` sizes the factors by each layer's weight RMS: on quanto's layers reading the
    weight failed, on bitsandbytes' the uint8 codes were read as the weight (and gave the factors their dtype)."""
    from engine.lora import synthetic_lora

    plain = synthetic_components("tiny", device="cpu", dtype=torch.bfloat16, seed=0)["transformer"]
    quantised = synthetic_components("tiny", device="cpu", dtype=torch.bfloat16, seed=0)["transformer"]
    for block in [*quantised.transformer_blocks, *quantised.single_transformer_blocks]:
        _quanto(block, "qint8") if kind == "quanto-qint8" else _bnb_nf4(block)
    expected, got = synthetic_lora(plain, 4, seed=1), synthetic_lora(quantised, 4, seed=1)
    assert got.keys() == expected.keys()
    for key, value in got.items():
        assert value.dtype == torch.bfloat16
        # the factors' std goes with the square root of the weight's RMS: 4-bit rounding moves it by a few percent
        assert value.float().std().item() == pytest.approx(expected[key].float().std().item(), rel=0.05)
