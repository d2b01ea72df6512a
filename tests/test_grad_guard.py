"""A backward through what optimize() put in the transformer (engine/grad_guard.py): refused where its gradients would
be wrong, exact where the blocks are PyTorch's maths; on the tiny model in fp32 on the CPU, against diffusers."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_call_kwargs
from diffusers import FluxPipeline

from engine import EngineConfig, optimize
from engine.config import AttentionConfig, OffloadConfig, QuantConfig
from engine.errors import ConfigError
from engine.lora import synthetic_lora
from engine.models import synthetic_components


def _pipe() -> FluxPipeline:
    return FluxPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0))


def _transformer_inputs() -> dict:
    """The keyword arguments diffusers' pipeline passes its transformer at the first step."""
    pipe, seen = _pipe(), {}

    def keep(module, args, kwargs):
        seen.setdefault("kwargs", {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    pipe.transformer.register_forward_pre_hook(keep, with_kwargs=True)
    pipe(**tiny_call_kwargs())
    return {**seen["kwargs"], "return_dict": False}


def _train_step(pipe, inputs: dict, adapter: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One LoRA training step's forward and backward, called on the transformer directly as a trainer does."""
    pipe.load_lora_weights(dict(adapter), adapter_name="trained")
    factors = {name: p.requires_grad_(True) for name, p in pipe.transformer.named_parameters() if "lora_" in name}
    with torch.enable_grad():
        out = pipe.transformer(**inputs)[0]
        out.pow(2).mean().backward()
    return out.detach(), {name: p.grad for name, p in factors.items()}


@pytest.fixture(scope="module")
def inputs_and_adapter():
    transformer = synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)["transformer"]
    return _transformer_inputs(), synthetic_lora(transformer, 4, seed=1, std=0.1)


@pytest.mark.parametrize(
    "config",
    [
        EngineConfig(attention=AttentionConfig(backend="auto"), quant=QuantConfig(transformer="fp8")),
        EngineConfig(attention=AttentionConfig(backend="auto"), offload=OffloadConfig("block")),
    ],
    ids=["fp8", "offload-block"],
)
def test_a_backward_through_fp8_or_streamed_blocks_is_refused(config, inputs_and_adapter):
    """Measured before the guard: LoRA gradients at cosine 0.53 (fp8: the gradient rounded to e4m3 through the
    activations' cast) and down to -0.27 (streamed: ring slots overwritten before the backward) from diffusers',
    without a word. The forward still runs (inference with grad mode on); the backward is refused before any
    gradient is written."""
    inputs, adapter = inputs_and_adapter
    pipe = optimize(_pipe(), config)
    with pytest.raises(ConfigError, match="no correct backward.*torch.no_grad().*'baseline' or 'compile'"):
        _train_step(pipe, inputs, adapter)
    assert all(p.grad is None for name, p in pipe.transformer.named_parameters() if "lora_" in name)
    with torch.enable_grad():  # a forward with grad mode on and nothing trainable: its output, no refusal
        pipe.set_adapters(["trained"], [1.0])
        for p in pipe.transformer.parameters():
            p.requires_grad_(False)
        assert torch.isfinite(pipe.transformer(**inputs)[0]).all()


def test_the_fused_blocks_in_pytorch_keep_diffusers_gradients(inputs_and_adapter):
    """The CPU's fused blocks are diffusers' maths in PyTorch: a LoRA's gradients through them are diffusers' (fp32;
    measured 1e-6 relative), so nothing is refused there."""
    inputs, adapter = inputs_and_adapter
    expected_out, expected = _train_step(_pipe(), inputs, adapter)
    fused = optimize(_pipe(), EngineConfig(attention=AttentionConfig(backend="auto")))
    out, grads = _train_step(fused, inputs, adapter)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=0)
    assert grads.keys() == expected.keys() and expected
    for name, grad in expected.items():
        # fp32, one fused GEMM against three split ones: the sums' order differs (rel. 1e-6 measured)
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need CUDA")
def test_a_backward_through_the_triton_kernels_is_refused_on_the_gpu(inputs_and_adapter):
    """The 'kernels' preset's Triton kernels (fused norms, QK-norm + RoPE, the attention core) register no backward."""
    inputs, adapter = inputs_and_adapter
    pipe = FluxPipeline(**synthetic_components("tiny", device="cuda", dtype=torch.bfloat16, seed=0))
    optimize(pipe, "kernels")
    on_gpu = {k: v.to("cuda", torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else
              v.to("cuda") if torch.is_tensor(v) else v for k, v in inputs.items()}  # fmt: skip
    with pytest.raises(ConfigError, match="Triton kernels.*no correct backward"):
        _train_step(pipe, on_gpu, {k: v.to(torch.bfloat16) for k, v in adapter.items()})
