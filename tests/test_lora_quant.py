"""LoRA adapters on quantised transformers (engine/quant/lora.py): diffusers' Flux LoRA calls on the engine's fp8,
fp8-weight and int8-weight presets (fused blocks), against plain diffusers with the same adapters, on the tiny model in
fp32 on the CPU (fp8 W8A8 emulated with the same e4m3 values; nf4 runs bitsandbytes' CUDA kernels: the GPU test).

A quantised preset is not diffusers' image to begin with, so each is held to its own stated tolerance against
diffusers (tests/test_quantize.py: 45 dB for fp8 and fp8-weight, 60 dB for int8-weight), now with the same adapter on
both sides; the adapter is strong enough that leaving it out of the engine fails that tolerance.
"""

from __future__ import annotations

import pytest
import torch
from conftest import fp8_inputs_fed, swap_without_recompiling, tiny_call_kwargs, trainer_format_lora
from diffusers import FluxPipeline
from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

from engine import EngineConfig, FluxEngine, optimize
from engine.config import AttentionConfig, CompileConfig, OffloadConfig, QuantConfig
from engine.errors import ConfigError, InputError
from engine.lora import synthetic_lora
from engine.measure import psnr
from engine.models import synthetic_components
from engine.pipeline import engine_config_of
from engine.quant import Fp8Linear
from flux_kernels.fp8 import quantize_fp8_rowwise

# the presets' own tolerances against diffusers (tests/test_quantize.py test_quantised_tiny_pipeline_end_to_end)
MIN_PSNR = {"fp8": 45.0, "fp8-weight": 45.0, "int8-weight": 60.0}
# std 0.15 (the tiny model's weights: 0.05): measured, the adapter moves diffusers' image by 36 dB PSNR, below every
# tolerance; the engine with it is 61 (fp8) / 80 (int8-weight) dB from diffusers with it, merged 58 / 72. Stronger
# adapters swamp the base weights, and a merge quantises their delta too (std 0.3: merged fp8 41 dB).
STD = 0.15


def _config(mode: str, **extra) -> EngineConfig:
    return EngineConfig(attention=AttentionConfig(backend="auto"), quant=QuantConfig(transformer=mode), **extra)


def _tiny() -> FluxPipeline:
    return FluxPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0))


def _image(pipe, **overrides) -> torch.Tensor:
    return pipe(**tiny_call_kwargs(**overrides)).images.float()


@pytest.fixture(scope="module")
def adapters():
    transformer = synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)["transformer"]
    return synthetic_lora(transformer, 4, seed=1, std=STD), synthetic_lora(transformer, 8, seed=2, std=STD)


@pytest.fixture(scope="module")
def reference_images(adapters):
    """diffusers' images: without adapters, with the first, with both at weights 0.7 / 1.3."""
    first, second = adapters
    reference = _tiny()
    plain = _image(reference)
    reference.load_lora_weights(dict(first), adapter_name="first")
    with_first = _image(reference)
    reference.load_lora_weights(dict(second), adapter_name="second")
    reference.set_adapters(["first", "second"], adapter_weights=[0.7, 1.3])
    return plain, with_first, _image(reference)


# fp8 also with its blocks streamed from host memory (quanto's fp8-weight / int8-weight cannot stream); "plain": the
# calls and images through a diffusers pipeline the engine never saw, over the optimised transformer (before, its
# load_lora_weights failed in diffusers' width check with a KeyError on the quantised layers)
@pytest.mark.parametrize(("mode", "offload", "through"), [
    ("fp8", "none", "engine"), ("fp8-weight", "none", "engine"), ("int8-weight", "none", "engine"),
    ("fp8", "block", "engine"), ("fp8", "none", "plain"), ("int8-weight", "none", "plain"), ("fp8", "block", "plain"),
])  # fmt: skip
def test_lora_calls_on_a_quantised_transformer_give_diffusers_images(mode, offload, through, adapters,
                                                                     reference_images):  # fmt: skip
    first, second = adapters
    plain, with_first, with_both = reference_images
    engine = FluxEngine.from_pipe(_tiny(), _config(mode, offload=OffloadConfig(offload)))
    if through == "plain":
        engine = FluxPipeline(**engine.components)
    bare = _image(engine)
    assert psnr(bare, plain) >= MIN_PSNR[mode]
    assert psnr(bare, with_first) < MIN_PSNR[mode]  # the adapter matters beyond the tolerance

    engine.load_lora_weights(dict(first), adapter_name="first")
    assert psnr(_image(engine), with_first) >= MIN_PSNR[mode]
    engine.load_lora_weights(dict(second), adapter_name="second")
    engine.set_adapters(["first", "second"], adapter_weights=[0.7, 1.3])
    both = _image(engine)
    assert psnr(both, with_both) >= MIN_PSNR[mode]
    engine.disable_lora()
    assert torch.equal(_image(engine), bare)  # the quantised base alone, untouched
    engine.enable_lora()
    engine.fuse_lora()
    assert psnr(_image(engine), with_both) >= MIN_PSNR[mode]  # merged: quantised again, with the deltas in
    engine.unfuse_lora()
    assert torch.equal(_image(engine), both)  # the original codes back, bit for bit
    engine.unload_lora_weights()
    assert torch.equal(_image(engine), bare)


def test_the_fp8_kernels_feed_the_adapted_projections_too(adapters, reference_images):
    """With the fused norm / GELU kernels, the fp8 projections that take their e4m3 output keep taking it with an
    adapter acting (the adapters' A factors read it too): the same 8 projections a block as without adapters, and
    the image within the fp8 tolerance of diffusers with the adapter, and close to the unfused fp8 path's."""
    first, _ = adapters
    _, with_first, _ = reference_images
    fused_norms = EngineConfig(
        attention=AttentionConfig(backend="sdpa", fused_norms=True), quant=QuantConfig(transformer="fp8")
    )
    engine = FluxEngine.from_pipe(_tiny(), fused_norms)
    bare = _image(engine)
    engine.load_lora_weights(dict(first), adapter_name="first")
    fed, images = fp8_inputs_fed(engine, lambda: _image(engine))
    transformer = engine.transformer
    blocks, singles = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
    assert sum(fed.values()) == 6 * blocks + 2 * singles  # as test_quantize's count without adapters
    assert psnr(images, with_first) >= MIN_PSNR["fp8"]
    unfused = FluxEngine.from_pipe(_tiny(), _config("fp8"))
    unfused.load_lora_weights(dict(first), adapter_name="first")
    # A reads fp8-rounded activations: measured 60.8 dB between the two (59.4 against diffusers)
    assert psnr(images, _image(unfused)) >= 50.0
    engine.fuse_lora()
    engine.disable_lora()  # merged, then disabled: unmerged, as PEFT's forward (which this path skips) would
    assert torch.equal(_image(engine), bare)


@pytest.mark.parametrize("layout", ["kohya", "xlabs"])
def test_trainer_format_loras_on_fp8(layout):
    """kohya's and XLabs' layouts on the fp8 preset (the kohya one also on the quantised adaLN modulation linears)."""
    reference = _tiny()
    plain = _image(reference)
    state = trainer_format_lora(reference.transformer, layout)
    reference.load_lora_weights(dict(state), adapter_name=layout)
    expected = _image(reference)
    assert psnr(plain, expected) < MIN_PSNR["fp8"]  # the adapter matters beyond the tolerance
    engine = FluxEngine.from_pipe(_tiny(), _config("fp8"))
    engine.load_lora_weights(dict(state), adapter_name=layout)
    assert psnr(_image(engine), expected) >= MIN_PSNR["fp8"]


def _fp8_rows(layer: Fp8Linear) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.weight_fp8.view(torch.uint8).clone(), layer.weight_scale.clone()


def test_fp8_merges_quantise_once_from_the_original_codes(adapters):
    """Two adapters merged one after the other into fp8 fused QKV rows: the codes are quantize(original + both
    deltas), not quantize(quantize(original + first) + second); the other rows are untouched; unmerging gives the
    original codes and scales back bit for bit."""
    first, second = adapters
    engine = FluxEngine.from_pipe(_tiny(), _config("fp8"))
    block = engine.transformer.transformer_blocks[0]
    original_codes, original_scales = _fp8_rows(block.qkv)
    dequantized = block.qkv.dequantized_weight()
    engine.load_lora_weights(dict(first), adapter_name="first")
    engine.load_lora_weights(dict(second), adapter_name="second")
    engine.set_adapters(["first", "second"])
    engine.fuse_lora(adapter_names=["first"])
    engine.fuse_lora(adapter_names=["second"])

    to_k = block.attn.to_k
    start, stop = to_k.get_base_layer().start, to_k.get_base_layer().stop
    delta = sum(to_k.get_delta_weight(name).float() for name in ("first", "second"))
    codes, scales = quantize_fp8_rowwise(dequantized[start:stop] + delta)
    merged_codes, merged_scales = _fp8_rows(block.qkv)
    assert torch.equal(merged_codes[start:stop], codes.view(torch.uint8))
    assert torch.equal(merged_scales[start:stop], scales.view(-1))
    assert not torch.equal(merged_codes[start:stop], original_codes[start:stop])

    engine.unfuse_lora()
    codes, scales = _fp8_rows(block.qkv)
    assert torch.equal(codes, original_codes) and torch.equal(scales, original_scales)


def test_fuse_then_unload_keeps_the_merge(adapters, reference_images):
    """diffusers' recipe to drop the adapters' cost: fuse_lora, then unload_lora_weights. The merged codes stay."""
    first, _ = adapters
    _, with_first, _ = reference_images
    engine = FluxEngine.from_pipe(_tiny(), _config("fp8"))
    engine.load_lora_weights(dict(first), adapter_name="first")
    engine.fuse_lora()
    fused = _image(engine)
    engine.unload_lora_weights()
    assert not any("lora" in name for name, _ in engine.transformer.named_modules())
    assert torch.equal(_image(engine), fused)
    assert psnr(fused, with_first) >= MIN_PSNR["fp8"]


def test_hotswap_on_fp8_recompiles_nothing(adapters):
    first, second = adapters
    torch._dynamo.reset()  # the blocks' code objects are shared by every test: start from no compiled variants
    engine = FluxEngine.from_pipe(_tiny(), _config("fp8", compile=CompileConfig("regional", backend="eager")))
    reference = FluxEngine.from_pipe(_tiny(), _config("fp8"))
    swapped = swap_without_recompiling(engine, first, second, _image)
    reference.load_lora_weights(dict(second), adapter_name="style")
    assert psnr(swapped, _image(reference)) >= 80  # the same fp8 values; eager and compiled sums differ in order


def test_unsupported_adapters_on_quantised_layers_are_refused_and_nothing_stays(adapters):
    first, _ = adapters
    engine = FluxEngine.from_pipe(_tiny(), _config("fp8"))
    before = _image(engine)
    dora = dict(first)
    for key in [k for k in first if k.endswith("lora_B.weight")]:
        dora[key.replace("lora_B.weight", "lora_magnitude_vector")] = torch.ones(first[key].shape[0])
    with pytest.raises(ConfigError, match="use_dora.*plain LoRA only"):
        engine.load_lora_weights(dora, adapter_name="dora")
    wide = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 3072),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(128, 4),
    }
    with pytest.raises(InputError, match="takes 3072 inputs.*quantised layer takes 128"):
        engine.load_lora_weights(wide, adapter_name="wide")
    # an A factor without its B (diffusers names the missing key; on quantised layers it failed with an IndexError)
    half = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 128)}
    with pytest.raises(InputError, match="to_q.lora_A.weight` without its `lora_B.weight`"):
        engine.load_lora_weights(half, adapter_name="half")
    assert engine.get_list_adapters() == {}
    assert not any("lora" in name for name, _ in engine.transformer.named_modules())
    assert torch.equal(_image(engine), before)


@pytest.mark.parametrize("config", [_config("none"), _config("fp8")], ids=["fused", "fp8"])
def test_adapters_loaded_before_optimize_are_refused_and_nothing_changes(adapters, config):
    """A LoRA loaded on the plain pipeline, then optimize(): fusing failed on PEFT's wrappers (KeyError), and fp8
    quantised the adapters' own factors, after which every call failed. Refused before any step; the pipeline is
    diffusers' with its adapter, as it was."""
    first, _ = adapters
    pipe = _tiny()
    pipe.load_lora_weights(dict(first), adapter_name="first")
    before = _image(pipe)
    with pytest.raises(ConfigError, match=r"adapters loaded \(first\) before optimize.*load_lora_weights\(\) after"):
        optimize(pipe, config)
    assert engine_config_of(pipe) is None and type(pipe.transformer.transformer_blocks[0]) is FluxTransformerBlock
    assert torch.equal(_image(pipe), before)
    pipe.unload_lora_weights()  # the fix the error names
    assert optimize(pipe, config) is pipe


def test_adapters_loaded_before_a_config_that_leaves_the_layers_are_taken(adapters):
    """tiled-vae rewrites no layer of the transformer: an adapter loaded before it acts as in diffusers."""
    first, _ = adapters
    pipe, reference = _tiny(), _tiny()
    for each in (pipe, reference):
        each.load_lora_weights(dict(first), adapter_name="first")
    assert optimize(pipe, "tiled-vae") is pipe
    assert torch.equal(_image(pipe), _image(reference))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="nf4 and fp8 tensor cores need CUDA")
@pytest.mark.parametrize(("mode", "offload"), [("nf4", "none"), ("fp8", "none"), ("nf4", "block"), ("fp8", "leaf")])
def test_lora_on_a_quantised_transformer_on_the_gpu(mode, offload):
    """bf16 on the GPU: bitsandbytes' nf4 layers and fp8 on the tensor cores, with an adapter, against diffusers with
    it; fuse and unfuse give the unmerged image back exactly."""
    components = synthetic_components("tiny", device="cuda", dtype=torch.bfloat16, seed=0)
    lora = synthetic_lora(components["transformer"], 8, seed=1, std=STD)
    reference = FluxPipeline(**components)
    reference.load_lora_weights(dict(lora), adapter_name="a")
    expected = _image(reference, generator=torch.Generator().manual_seed(0))
    engine = FluxEngine.from_pipe(
        FluxPipeline(**synthetic_components("tiny", device="cuda", dtype=torch.bfloat16, seed=0)),
        EngineConfig(quant=QuantConfig(transformer=mode), offload=OffloadConfig(offload)),
    )
    engine.load_lora_weights(dict(lora), adapter_name="a")
    with_lora = _image(engine)
    assert psnr(with_lora, expected) >= 30.0  # bf16 and 4-bit: the tiny model's stated nf4 floor
    if (mode, offload) == ("nf4", "block"):  # bitsandbytes re-quantises on the GPU; streamed weights live on the host
        with pytest.raises(ConfigError, match="fuse_lora on an nf4 transformer whose blocks stream.*Nothing was"):
            engine.fuse_lora()
        assert torch.equal(_image(engine), with_lora)
        return
    engine.fuse_lora()
    engine.unfuse_lora()
    assert torch.equal(_image(engine), with_lora)


class _Adapted(torch.nn.Module):
    """What add_update reads of a PEFT layer: its B factors and scalings."""

    def __init__(self, rank: int, width: int, scaling: float):
        super().__init__()
        self.lora_B = torch.nn.ModuleDict({"a": torch.nn.Linear(rank, width, bias=False)})
        self.scaling = {"a": scaling}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
def test_in_place_update_beside_fp8_adds_b_into_its_columns_only(compiled):
    """add_update's in-place path (lora_addmm_, beside fp8 bases): B(low) * scaling lands in the adapter's columns of
    the fused output, rounded once (within one bf16 rounding of PEFT's add), and no other column moves, also as a
    mutating op inside a compiled graph."""
    from engine.lora_update import add_update

    generator = torch.Generator().manual_seed(0)
    layer = _Adapted(rank=8, width=6, scaling=0.5).to(torch.bfloat16)
    out = torch.randn(2, 5, 16, generator=generator).to(torch.bfloat16)
    low = torch.randn(2, 5, 8, generator=generator).to(torch.bfloat16)
    exact = out.float()
    exact[..., 4:10] += (low.float() @ layer.lora_B["a"].weight.float().t()) * 0.5

    def update(out, low, in_place):
        return add_update(out.clone(), 4, layer, "a", low, in_place=in_place)

    run = torch.compile(update, backend="aot_eager", fullgraph=True) if compiled else update
    with torch.no_grad():  # inference, as the pipelines call it
        fused, peft = run(out, low, True), update(out, low, False)
        one_gemm = out.clone()  # what lora_addmm_ computes: one addmm into the columns
        one_gemm.view(-1, 16)[:, 4:10].addmm_((low * 0.5).reshape(-1, 8), layer.lora_B["a"].weight.t())
    assert torch.equal(fused, one_gemm) and not torch.equal(fused, peft)  # the in-place path ran, not PEFT's add
    assert torch.equal(fused[..., :4], out[..., :4]) and torch.equal(fused[..., 10:], out[..., 10:])
    bf16_step = exact[..., 4:10].abs() * 2**-7 + 1e-6  # one rounding to bf16
    assert ((fused[..., 4:10].float() - exact[..., 4:10]).abs() <= bf16_step).all()
    assert ((fused.float() - peft.float()).abs() <= 2 * bf16_step.max()).all()
    assert not torch.equal(fused, out)


def test_lora_addmm_op_registration():
    from engine.lora_update import lora_addmm_

    out, low, up = torch.randn(6, 10), torch.randn(6, 3), torch.randn(4, 3)
    torch.library.opcheck(lora_addmm_._opoverload, (out, low, up, 5))


def test_in_place_update_steps_aside_when_gradients_are_recorded():
    """lora_addmm_ has no backward: with autograd recording, the update is PEFT's add, and B gets its gradient."""
    from engine.lora_update import add_update

    layer = _Adapted(rank=4, width=3, scaling=2.0)
    out, low = torch.randn(5, 8), torch.randn(5, 4)
    add_update(out.clone(), 2, layer, "a", low, in_place=True).sum().backward()
    assert layer.lora_B["a"].weight.grad is not None
    torch.testing.assert_close(layer.lora_B["a"].weight.grad, 2.0 * low.sum(0).expand(3, 4))


def _fused_gemms(call) -> tuple[int, object]:
    """How many of engine.lora_gemm's one-GEMM projections (the updates in the fp8 GEMM's epilogue) ran in call()."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.flux_engine.fp8_lora_gemm.default:
                calls.append(func)
            return func(*args, **(kwargs or {}))

    with Count():
        result = call()
    return len(calls), result


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_fp8_projections_take_their_updates_in_the_gemm_epilogue(adapters, monkeypatch, device):
    """A bf16 pipeline on the fp8 preset with the fused kernels: every adapted fp8 projection with e4m3 input runs as
    one GEMM with the adapters' updates in its epilogue (flux_kernels.fp8_lora_gemm; on the CPU in the Triton
    interpreter), two adapters at set_adapters weights included; the image is the two-GEMM path's
    (FLUX_ENGINE_LORA_GEMM=0) within bf16 roundings, and diffusers' with the same adapters within the fp8 preset's
    tolerance."""
    from engine import lora_gemm

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    first, second = adapters

    def tiny_bf16() -> FluxPipeline:
        return FluxPipeline(**synthetic_components("tiny", device=device, dtype=torch.bfloat16, seed=0))

    reference = tiny_bf16()
    config = EngineConfig(
        attention=AttentionConfig(backend="sdpa", fused_norms=True), quant=QuantConfig(transformer="fp8")
    )
    fast = FluxEngine.from_pipe(tiny_bf16(), config)
    for pipe in (reference, fast):
        pipe.load_lora_weights(dict(first), adapter_name="first")
        pipe.load_lora_weights(dict(second), adapter_name="second")
        pipe.set_adapters(["first", "second"], [0.7, 1.3])
    expected = _image(reference)
    fused_calls, fused = _fused_gemms(lambda: _image(fast))
    transformer = fast.transformer
    blocks, singles = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
    steps = tiny_call_kwargs()["num_inference_steps"]
    assert fused_calls == steps * (6 * blocks + 2 * singles)  # every projection fed e4m3 (test above's count)
    monkeypatch.setattr(lora_gemm, "ENABLED", False)
    two_gemm_calls, two_gemms = _fused_gemms(lambda: _image(fast))
    assert two_gemm_calls == 0
    # measured on the CPU: 47.6 dB between the two paths (low and each projection's output rounded once here, twice
    # there), 45.9 / 46.5 dB from diffusers' bf16 image (46.2 before low came out of the A GEMM scaled, 2026-12-02:
    # random-walk differences of bf16 roundings on a tiny random model, both above the fp8 preset's 45)
    assert psnr(fused, two_gemms) >= 45.0
    assert psnr(fused, expected) >= MIN_PSNR["fp8"]


def test_the_one_gemm_path_pads_ranks_to_the_kernels_and_leaves_larger_ones_to_the_other_path():
    from engine.lora_gemm import MAX_RANK, padded_rank

    assert padded_rank([4, 8]) == 16  # the kernel's bf16 MMA needs R >= 16
    assert padded_rank([0, 24, 64]) == 64
    assert padded_rank([MAX_RANK + 1]) == 0  # a hot-swap target rank of 128: the two-GEMM path, as before


def test_the_one_gemm_op_takes_misaligned_views_through_its_reference():
    """TMA descriptors need 16-byte aligned bases: the op given a weight view one byte in computes the same sum as
    on an aligned copy (through the fp32 reference, one rounding either way) instead of failing."""
    from engine.lora_gemm import fp8_lora_gemm_op
    from flux_kernels.fp8_lora_gemm import lora_columns

    generator = torch.Generator().manual_seed(0)
    x_fp8, x_scale = quantize_fp8_rowwise(torch.randn(8, 64, generator=generator))
    storage, w_scale = quantize_fp8_rowwise(torch.randn(65, 64, generator=generator))
    weight = storage.view(-1)[1 : 1 + 64 * 64].view(64, 64)  # one byte past an aligned base
    assert weight.data_ptr() % 16
    low = torch.randn(8, 16, generator=generator).bfloat16()
    up = (torch.randn(64, 16, generator=generator) * 0.1).bfloat16()
    low_col = lora_columns([64], [16], 16, "cpu")
    out = fp8_lora_gemm_op(x_fp8, x_scale.reshape(-1), weight, w_scale[:64].reshape(-1), None, low, low_col, up, 64,
                           True)  # fmt: skip
    aligned = fp8_lora_gemm_op(x_fp8, x_scale.reshape(-1), weight.clone(), w_scale[:64].reshape(-1), None, low,
                               low_col, up, 64, True)  # fmt: skip (the kernel, in the interpreter)
    # fp32 sums in two orders, one bf16 rounding each: within a bf16 ulp
    torch.testing.assert_close(out.float(), aligned.float(), rtol=2**-7, atol=1e-3)


def test_the_one_gemm_path_leaves_layers_with_hooks_of_their_own_to_their_forward():
    """Offload 'leaf' moves a layer's weights onto the GPU in a forward pre-hook: a layer with hooks keeps the
    two-GEMM path, which calls its forward."""
    from types import SimpleNamespace

    from engine.lora_gemm import fused_update_ready

    base = Fp8Linear.from_linear(torch.nn.Linear(64, 64), compute="emulate")
    adapter = SimpleNamespace(lora_A={"a": torch.nn.Linear(64, 16, bias=False)},
                              lora_B={"a": torch.nn.Linear(16, 64, bias=False)})  # fmt: skip
    x_fp8, _ = quantize_fp8_rowwise(torch.randn(8, 64))
    with torch.no_grad():
        assert fused_update_ready(base, x_fp8, [64], [[(adapter, "a")]], torch.bfloat16)
        handle = base.register_forward_pre_hook(lambda module, args: None)
        assert not fused_update_ready(base, x_fp8, [64], [[(adapter, "a")]], torch.bfloat16)
        handle.remove()
        assert not fused_update_ready(base, x_fp8, [64], [[(adapter, "a")]], torch.float32)  # fp32 out: the other path


@pytest.mark.parametrize("mode", ["fp8", "int8-weight"])
def test_peft_add_adapter_then_its_factors_set_give_diffusers_image(mode, adapters):
    """PEFT's own route (training code, adapters built from a LoraConfig): transformer.add_adapter, then the factors
    set by load_state_dict. Before: PEFT refused the fused fp8 parts ("Target module FusedAway() is not supported")."""
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"])
    reference = _tiny()
    reference.transformer.add_adapter(config, adapter_name="peft")
    generator = torch.Generator().manual_seed(3)
    factors = {name: torch.randn(value.shape, generator=generator) * STD
               for name, value in reference.transformer.state_dict().items() if ".lora_" in name}  # fmt: skip
    assert not reference.transformer.load_state_dict(factors, strict=False).unexpected_keys
    expected = _image(reference)
    engine = optimize(_tiny(), _config(mode))
    bare = _image(engine)
    assert psnr(bare, expected) < MIN_PSNR[mode]  # the adapter matters beyond the tolerance
    engine.transformer.add_adapter(config, adapter_name="peft")
    assert torch.equal(_image(engine), bare)  # PEFT's lora_B starts at zero
    assert not engine.transformer.load_state_dict(factors, strict=False).unexpected_keys
    assert psnr(_image(engine), expected) >= MIN_PSNR[mode]  # factors set after a call are read, not a stale copy
    engine.transformer.disable_adapters()
    assert torch.equal(_image(engine), bare)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp8 tensor cores and CUDA graphs need CUDA")
def test_peft_add_adapter_on_the_fastest_preset_reads_factors_set_after_a_capture():
    """The same on fp8-compile-fastacc-cudagraphs: factors set in place after the graph was captured with PEFT's zero
    lora_B are what the replay reads."""
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"])

    def tiny():
        return FluxPipeline(**synthetic_components("tiny", device="cuda", dtype=torch.bfloat16, seed=0))

    reference = tiny()
    reference.transformer.add_adapter(config, adapter_name="peft")
    generator = torch.Generator().manual_seed(3)
    factors = {name: (torch.randn(value.shape, generator=generator) * STD).to(value)
               for name, value in reference.transformer.state_dict().items() if ".lora_" in name}  # fmt: skip
    reference.transformer.load_state_dict(factors, strict=False)
    expected = _image(reference)

    def with_adapter():
        engine = FluxEngine.from_pipe(tiny(), "fp8-compile-fastacc-cudagraphs")
        engine.transformer.add_adapter(config, adapter_name="peft")
        return engine

    late = with_adapter()
    for _ in range(2):  # warm, then capture with lora_B at zero
        bare = _image(late)
    late.transformer.load_state_dict(factors, strict=False)
    images = _image(late)
    early = with_adapter()  # the factors set before any call: what `late` must give too
    early.transformer.load_state_dict(factors, strict=False)
    for _ in range(2):
        set_first = _image(early)
    # the same kernels and factors: the same image (>= 60 dB leaves room for a reordered sum); the zero lora_B's
    # image was 43 dB from diffusers' with the adapter (measured, H200 2026-12-03: the tiny bf16 model)
    assert psnr(images, set_first) >= 60.0 > psnr(bare, set_first)
    assert psnr(images, expected) >= 35.0  # fp8 weights on the tiny model in bf16 (tests/test_tasks.py)
