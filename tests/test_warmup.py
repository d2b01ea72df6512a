"""engine.warmup: which attention function a core warms, that it runs only on CUDA and when on, and what it runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import warmup


def test_each_core_warms_the_function_whose_kernels_are_compiled_at_run_time():
    from flux_kernels.cudnn_attention import cudnn_fp8_attention

    assert warmup.warm_call(None) is F.scaled_dot_product_attention  # diffusers' own processors call SDPA
    assert warmup.warm_call("sdpa") is F.scaled_dot_product_attention
    assert warmup.warm_call("cudnn-fp8") is cudnn_fp8_attention
    assert warmup.warm_call("triton") is None and warmup.warm_call("triton-fp8") is None


def test_the_switch_is_read_and_checked(monkeypatch):
    monkeypatch.delenv(warmup.ENV, raising=False)
    assert warmup.enabled()
    monkeypatch.setenv(warmup.ENV, "0")
    assert not warmup.enabled()
    monkeypatch.setenv(warmup.ENV, "off")
    with pytest.raises(ValueError, match=r"FLUX_ENGINE_WARM_ATTENTION='off'.*1 .*or 0"):
        warmup.enabled()


def test_nothing_runs_off_cuda_or_when_switched_off(tiny_components, monkeypatch):
    transformer = tiny_components["transformer"]
    monkeypatch.delenv(warmup.ENV, raising=False)
    assert warmup.warm_attention(transformer, "sdpa") is None  # a CPU model: nothing is compiled at run time
    if torch.cuda.is_available():
        from diffusers import FluxTransformer2DModel

        monkeypatch.setenv(warmup.ENV, "0")
        on_cuda = FluxTransformer2DModel.from_config(transformer.config).to("cuda")
        assert warmup.warm_attention(on_cuda, "sdpa") is None


@pytest.mark.gpu
def test_the_warm_runs_the_core_at_both_kinds_of_length(tiny_components, monkeypatch):
    from diffusers import FluxTransformer2DModel

    monkeypatch.delenv(warmup.ENV, raising=False)
    config = tiny_components["transformer"].config
    transformer = FluxTransformer2DModel.from_config(config).to("cuda", torch.bfloat16)

    result = warmup.warm_attention(transformer, "sdpa")

    assert result["core"] == "sdpa" and sorted(result["ms"]) == sorted(warmup.WARM_TOKENS)
    assert {tokens % 128 == 0 for tokens in warmup.WARM_TOKENS} == {True, False}
    assert all(ms > 0 for ms in result["ms"].values())


def test_the_prompt_encoding_is_warmed_only_with_both_encoders_on_cuda(tiny_components, monkeypatch):
    from diffusers import FluxPipeline

    monkeypatch.delenv(warmup.ENV, raising=False)
    assert warmup.warm_text_encoders(FluxPipeline(**tiny_components)) is None  # on the CPU: nothing compiles
    assert warmup.warm_text_encoders(FluxPipeline(**{**tiny_components, "text_encoder_2": None})) is None


@pytest.mark.gpu
def test_the_prompt_encoding_warm_runs_and_leaves_the_image_as_it_was(monkeypatch):
    from conftest import tiny_call_kwargs
    from diffusers import FluxPipeline

    from engine.models import synthetic_components

    monkeypatch.delenv(warmup.ENV, raising=False)
    pipe = FluxPipeline(**synthetic_components("tiny", device="cuda", dtype=torch.float32, seed=0))
    before = pipe(**tiny_call_kwargs()).images
    seconds = warmup.warm_text_encoders(pipe)
    assert seconds is not None and seconds > 0
    assert torch.equal(pipe(**tiny_call_kwargs()).images, before)
    monkeypatch.setenv(warmup.ENV, "0")
    assert warmup.warm_text_encoders(pipe) is None
