"""Weight quantisation: the fp8 arithmetic (emulated on the CPU), Fp8Linear, the quanto weight-only paths on the
tiny pipeline, exact weight-memory accounting on the real flux-dev config (meta device), fused projections (fused
then quantised, and quantised then fused: the same bytes), fp8 save/load and quantised pipeline folders with the
fused kernels, the norm kernels' e4m3 outputs fed to the fp8 projections, fullgraph compile of quantised blocks;
on a GPU, `_scaled_mm` (with the norm kernels' outputs, with fast accumulation) and NF4. Quantising while loading is
tested in test_models.py.

Thresholds, with what they rest on (measured on this CPU, 2026-11-26, unless said otherwise):
- e4m3 has 3 mantissa bits: one rounding is at most 2^-4 relative, ~31 dB SQNR on Gaussian data; W8A8
  (weights and activations rounded) measured 28.5-29.6 dB per layer on the tiny model, so >= 25 dB
  (the issue's per-layer target) fails on a real defect (a wrong scale axis drops it below 10 dB).
- fp8-weight (quanto qfloat8) 31.7-32.6 dB, int8-weight 44-48 dB per layer.
- tiny pipeline images vs fp32: fp8 60.0 dB, fp8-weight 60.4 dB, int8-weight 78.5 dB PSNR; asserted
  >= 45 / 45 / 60 dB (an unquantised-bias or wrong-row bug measured < 30 dB).
"""

import gc
import weakref
from dataclasses import replace

import pytest
import torch
from conftest import fp8_inputs_fed, tiny_call_kwargs
from diffusers import FluxPipeline
from torch import nn
from torch._dynamo.utils import counters

from engine import EngineConfig, FluxEngine
from engine.config import PRESETS, AttentionConfig, CompileConfig, QuantConfig
from engine.errors import CheckpointError, ConfigError
from engine.measure import psnr, sqnr_db
from engine.memory.weights import (
    actual_weight_bytes,
    linear_weight_bytes,
    meta_component,
    nf4_layer_bytes,
    weight_bytes,
)
from engine.models import synthetic_components
from engine.quant import (
    E4M3_MAX,
    Fp8Linear,
    FusedAway,
    apply_quantization,
    fp8_linear,
    layer_sqnr,
    load_fp8_transformer,
    quantization_report,
    save_fp8_transformer,
)
from flux_kernels.fp8 import FP8_DTYPE, quantize_fp8_rowwise

GIB = 2**30


def _fresh_pipe(dtype=torch.float32, device="cpu") -> FluxPipeline:
    return FluxPipeline(**synthetic_components("tiny", device=device, dtype=dtype, seed=0))


def _all_e4m3_values() -> torch.Tensor:
    codes = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    return codes[torch.isfinite(codes)].unique()


# ----------------------------------------------------------------------------- config


def test_quant_config_modes_and_errors():
    config = QuantConfig(transformer="fp8", text_encoder_2="nf4", nf4_double_quant=True)
    assert config.label == "dit=fp8,t5=nf4,nf4dq"
    with pytest.raises(ConfigError, match=r"quant.text_encoder='int4' is not one of 'none', 'fp8', 'fp8-weight'"):
        QuantConfig(text_encoder="int4")
    with pytest.raises(ConfigError, match="nf4_double_quant=True needs a component in mode 'nf4'"):
        QuantConfig(transformer="fp8", nf4_double_quant=True)
    with pytest.raises(ConfigError, match="fp8_fast_accum=True needs a component in mode 'fp8'"):
        QuantConfig(transformer="int8-weight", fp8_fast_accum=True)
    with pytest.raises(ConfigError, match=r"quant.fp8_fused_input=1 must be True or False"):
        QuantConfig(transformer="fp8", fp8_fused_input=1)
    assert QuantConfig("fp8", fp8_fast_accum=True, fp8_fused_input=False).label == "dit=fp8,fastacc,unfused-quant"
    assert QuantConfig("nf4", fp8_fused_input=False).label == "dit=nf4"  # no fp8 layer: the switch means nothing
    for name in ("fp8", "fp8-compile", "nf4", "int8-weight"):
        assert PRESETS[name].quant.transformer != "none"
    assert PRESETS["fp8-compile"].compile.mode == "regional"


# ----------------------------------------------------------------------------- fp8 arithmetic


def test_fp8_rounding_is_to_the_nearest_e4m3_value():
    torch.manual_seed(0)
    x = torch.randn(64, 200) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different magnitudes
    q, scale = quantize_fp8_rowwise(x)
    assert q.dtype == FP8_DTYPE and scale.shape == (64, 1)
    grid = _all_e4m3_values()  # every finite e4m3 value
    scaled = (x / scale).clamp(-E4M3_MAX, E4M3_MAX)
    nearest = grid[(scaled[..., None] - grid).abs().argmin(dim=-1)]
    torch.testing.assert_close(q.float(), nearest, rtol=0, atol=0)


def test_fp8_scale_maps_each_rows_amax_to_448_and_saturates():
    x = torch.tensor([[1e4, 1.0, -3.0, 1e-3], [-7.0, 2.0, 0.5, 0.0], [1e-30, -2e-30, 0.0, 5e-31]])
    q, scale = quantize_fp8_rowwise(x)
    torch.testing.assert_close(scale.squeeze(1), x.abs().amax(dim=1) / E4M3_MAX)
    assert q.float().abs().amax(dim=1).tolist() == [E4M3_MAX] * 3
    assert torch.isfinite(q.float()).all()
    # a static scale: everything past 448 * scale saturates to +-448, never NaN
    static, _ = quantize_fp8_rowwise(torch.tensor([[100.0, -1e6, 449.0, 3e38]]), scale=torch.tensor([[0.5]]))
    assert static.float().tolist() == [[192.0, -E4M3_MAX, E4M3_MAX, E4M3_MAX]]  # 200: a tie, to even (192)
    big = torch.full((2, 32), 3e38)
    assert torch.isfinite(quantize_fp8_rowwise(big)[0].float()).all()


def test_fp8_zero_rows_give_zeros_not_nan():
    x = torch.randn(4, 64)
    x[1] = 0.0
    q, scale = quantize_fp8_rowwise(x)
    assert (q[1].float() == 0).all() and scale[1].item() > 0
    linear = nn.Linear(64, 32)
    linear.weight.data[3] = 0.0  # a zero output channel
    out = Fp8Linear.from_linear(linear, compute="emulate")(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], linear.bias.detach())  # zero token -> bias exactly
    torch.testing.assert_close(out[:, 3], linear.bias.detach()[3].expand(4))


def test_non_finite_weights_are_rejected_with_the_layer_name():
    with pytest.raises(ValueError, match="has 2 inf/nan values"):
        quantize_fp8_rowwise(torch.tensor([[1.0, float("inf")], [float("nan"), 0.0]]), check_finite=True)
    linear = nn.Linear(16, 16)
    linear.weight.data[2, 5] = float("inf")
    with pytest.raises(CheckpointError, match="layer blocks.3.ff: tensor of shape .16, 16. has 1 inf/nan"):
        Fp8Linear.from_linear(linear, name="blocks.3.ff")


def test_non_finite_activation_poisons_its_row_only():
    # Checking activations would cost a host sync per layer; a non-finite token must still not become a
    # plausible finite output.
    layer = Fp8Linear.from_linear(nn.Linear(32, 16), compute="emulate")
    x = torch.randn(3, 32)
    x[1, 4] = float("inf")
    out = layer(x)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()


def test_emulation_matches_torch_scaled_mm_on_the_same_fp8_values():
    # torch's own CPU _scaled_mm (row-wise scales) is the hardware op's contract; the emulation must agree
    torch.manual_seed(1)
    x, linear = torch.randn(77, 256, dtype=torch.bfloat16), nn.Linear(256, 384, dtype=torch.bfloat16)
    layer = Fp8Linear.from_linear(linear, compute="emulate")
    x_fp8, x_scale = quantize_fp8_rowwise(x)
    expected = torch._scaled_mm(
        x_fp8, layer.weight_fp8.t(), scale_a=x_scale, scale_b=layer.weight_scale.view(1, -1),
        bias=layer.bias, out_dtype=torch.bfloat16,
    )  # fmt: skip
    got = fp8_linear(x, layer.weight_fp8, layer.weight_scale, layer.bias, "emulate")
    assert sqnr_db(got.float(), expected.float()) > 45  # both round the fp32 sum to bf16 (~50 dB apart)


def test_pre_quantised_input_is_the_same_arithmetic():
    """forward(x_fp8, x_scale), what the norm kernels' fp8 outputs feed, is forward(x) without the quantising."""
    torch.manual_seed(2)
    x, linear = torch.randn(2, 9, 64, dtype=torch.bfloat16), nn.Linear(64, 48, dtype=torch.bfloat16)
    layer = Fp8Linear.from_linear(linear, compute="emulate")
    assert layer.takes_fp8_input
    x_fp8, x_scale = quantize_fp8_rowwise(x)
    out = layer(x_fp8, x_scale)
    assert out.shape == (2, 9, 48) and out.dtype == torch.bfloat16
    assert torch.equal(out, layer(x))
    with pytest.raises(ValueError, match=r"pre-quantised input must be torch.float8_e4m3fn \[..., 64\]"):
        layer(x, x_scale)
    with pytest.raises(ValueError, match=r"scales \(2, 9\)"):
        layer(x_fp8, x_scale[..., 0])
    with pytest.raises(ValueError, match=r"got torch.float8_e4m3fn \(2, 9, 32\)"):
        layer(x_fp8[..., :32], x_scale)
    with pytest.raises(ValueError, match=r"torch.float64 scales"):
        layer(x_fp8, x_scale.double())
    with pytest.raises(ValueError, match=r"an e4m3 input needs its per-token scales"):
        layer(x_fp8)
    assert layer(x_fp8, x_scale, out_dtype=torch.float32).dtype == torch.float32
    bias_free = Fp8Linear.from_linear(nn.Linear(64, 48, bias=False, dtype=torch.float16), compute="emulate")
    assert bias_free(x_fp8, x_scale).dtype == torch.bfloat16  # no bias to take the dtype from: bf16, or say it
    assert bias_free(x_fp8, x_scale, out_dtype=torch.float16).dtype == torch.float16
    weight_only = Fp8Linear.from_linear(linear, compute="weight-only")
    assert not weight_only.takes_fp8_input
    with pytest.raises(ValueError, match="compute='weight-only' takes no pre-quantised input"):
        weight_only(x_fp8, x_scale)
    layer.fused_input = False
    assert not layer.takes_fp8_input


@pytest.mark.parametrize(("tokens", "in_features", "out_features"), [(1, 3072, 64), (77, 256, 384), (4097, 128, 96)])
def test_fp8_linear_sqnr_against_bf16_linear(tokens, in_features, out_features):
    torch.manual_seed(tokens)
    linear = nn.Linear(in_features, out_features, dtype=torch.bfloat16)
    x = torch.randn(1, tokens, in_features, dtype=torch.bfloat16)
    quantized = Fp8Linear.from_linear(linear, compute="emulate")
    out = quantized(x)
    assert out.shape == (1, tokens, out_features) and out.dtype == torch.bfloat16
    assert sqnr_db(out.float(), linear(x).float()) >= 25.0
    assert layer_sqnr(linear, "fp8", x[0]) >= 25.0
    # per-channel really is per output channel: a row scaled by 1e3 keeps the others' precision
    linear.weight.data[0] *= 1000
    assert sqnr_db(Fp8Linear.from_linear(linear)(x)[..., 1:].float(), linear(x)[..., 1:].float()) >= 25.0


# ----------------------------------------------------------------------------- the tiny pipeline


@pytest.fixture(scope="module")
def fp32_reference_images(tiny_components):
    return FluxPipeline(**tiny_components)(**tiny_call_kwargs()).images


@pytest.mark.parametrize(("mode", "min_psnr"), [("fp8", 45.0), ("fp8-weight", 45.0), ("int8-weight", 60.0)])
def test_quantised_tiny_pipeline_end_to_end(mode, min_psnr, fp32_reference_images):
    config = EngineConfig(quant=QuantConfig(transformer=mode, text_encoder_2=mode, text_encoder=mode))
    engine = FluxEngine.from_pipe(_fresh_pipe(), config)
    images = engine(**tiny_call_kwargs()).images
    assert psnr(images, fp32_reference_images) >= min_psnr
    report = quantization_report(engine)
    assert set(report) == {"transformer", "text_encoder_2", "text_encoder"}
    assert report["transformer"]["kept_layers"] == [
        "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
        "time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2",
        "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
        "context_embedder", "x_embedder", "norm_out.linear", "proj_out",
    ]  # fmt: skip
    for component in report.values():
        assert component["sqnr"]["min_db"] >= 25.0


def test_fp8_codes_stay_e4m3_through_a_dtype_change():
    """pipe.to(bfloat16) after fp8 quantisation: the codes and their fp32 scales stay as they are (before, the codes
    became bfloat16 without a word: the weights' memory doubled), the biases and the rest follow; the image is
    diffusers' bf16 one within the fp8 preset's tolerance."""
    config = EngineConfig(attention=AttentionConfig(backend="auto"), quant=QuantConfig(transformer="fp8"))
    engine = FluxEngine.from_pipe(_fresh_pipe(), config)
    layers = [m for m in engine.transformer.modules() if isinstance(m, Fp8Linear)]
    codes = {id(m): (m.weight_fp8.clone(), m.weight_scale.clone()) for m in layers}
    engine.to(torch.bfloat16)
    assert layers and all(m.weight_fp8.dtype == FP8_DTYPE and m.weight_scale.dtype == torch.float32 for m in layers)
    assert all(torch.equal(m.weight_fp8.view(torch.uint8), codes[id(m)][0].view(torch.uint8))
               and torch.equal(m.weight_scale, codes[id(m)][1]) for m in layers)  # fmt: skip
    assert all(m.bias.dtype == torch.bfloat16 for m in layers if m.bias is not None)
    reference = _fresh_pipe().to(torch.bfloat16)
    # measured 48.6 dB against diffusers in bf16 (the probe's figure), the preset's 45 dB tolerance
    assert psnr(engine(**tiny_call_kwargs()).images, reference(**tiny_call_kwargs()).images) >= 45.0


def test_nf4_on_cpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="nf4 quantisation runs bitsandbytes' CUDA kernels.*'int8-weight'"):
        apply_quantization(_fresh_pipe(), QuantConfig(transformer="nf4"))


def test_fused_projections_are_quantised_and_release_the_bf16_weight():
    pipe = _fresh_pipe()
    engine = FluxEngine.from_pipe(pipe, EngineConfig(attention=AttentionConfig(backend="auto")))  # fused, no Triton
    double, single = engine.transformer.transformer_blocks[0], engine.transformer.single_transformer_blocks[0]
    fused_weight = weakref.ref(double.qkv.weight)
    view_weight = weakref.ref(double.attn.to_q.weight)
    apply_quantization(engine, QuantConfig(transformer="fp8"))
    gc.collect()
    assert isinstance(double.qkv, Fp8Linear) and isinstance(double.txt_qkv, Fp8Linear)
    assert isinstance(single.linear1, Fp8Linear)
    for module in (double.attn.to_q, double.attn.add_v_proj, single.attn.to_k, single.proj_mlp):
        assert isinstance(module, FusedAway)
    assert fused_weight() is None and view_weight() is None
    # nothing else holds model memory: the fused model's bytes are exactly the fp8 layout's (the same for fp8)
    unfused = meta_component("tiny", "transformer", torch.float32)
    assert actual_weight_bytes(engine.transformer) == weight_bytes(unfused, "fp8")
    with pytest.raises(ConfigError, match="fused into `transformer_blocks.0.qkv`"):
        double.attn.to_q(torch.zeros(1, 1))
    # without the fused path the diffusers projections themselves are quantised
    plain = _fresh_pipe()
    apply_quantization(plain, QuantConfig(transformer="fp8"))
    assert isinstance(plain.transformer.transformer_blocks[0].attn.to_q, Fp8Linear)


# ----------------------------------------------------------------------------- memory accounting


@pytest.mark.parametrize("mode", ["fp8", "fp8-weight", "int8-weight"])
def test_weight_bytes_equals_the_quantised_models_bytes(mode):
    pipe = _fresh_pipe(dtype=torch.bfloat16)
    expected = {c: weight_bytes(meta_component("tiny", c), mode, c) for c in ("transformer", "text_encoder_2")}
    apply_quantization(pipe, QuantConfig(transformer=mode, text_encoder_2=mode))
    for component, value in expected.items():
        assert actual_weight_bytes(getattr(pipe, component)) == value


def test_weight_bytes_of_flux_dev_meet_the_targets_exactly():
    transformer, t5 = meta_component("flux-dev", "transformer"), meta_component("flux-dev", "text_encoder_2")
    assert all(p.device.type == "meta" for p in transformer.parameters())
    # independent count: every quantised Linear from its shape, everything else at 2 bytes per element
    linears = [(n, m) for n, m in transformer.named_modules() if type(m) is nn.Linear]
    kept = {"x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out"}
    quantized = [m for n, m in linears if n.split(".")[0] not in kept]
    quantized_params = sum(m.weight.numel() + m.bias.numel() for m in quantized)
    total_params = sum(p.numel() for p in transformer.parameters())
    rows = sum(m.out_features for m in quantized)
    biases = sum(m.bias.numel() for m in quantized)
    expected_fp8 = (total_params - quantized_params) * 2 + (quantized_params - biases) + 4 * rows + 2 * biases
    assert weight_bytes(transformer, "fp8") == expected_fp8 == 11_980_728_448
    assert weight_bytes(transformer, "none") == total_params * 2 == 23_802_816_640
    assert weight_bytes(transformer, "fp8") / GIB <= 11.5
    assert weight_bytes(transformer, "nf4") == 6_791_144_448 and weight_bytes(transformer, "nf4") / GIB <= 6.5
    assert weight_bytes(t5, "nf4") == 2_868_271_616 and weight_bytes(t5, "nf4") / GIB <= 3.0
    # one NF4 layer by hand: 3072x12288 -> 18.9M packed bytes + 589824 fp32 block scales + the 16-entry code
    assert nf4_layer_bytes(12288, 3072, double_quant=False) == 3072 * 12288 // 2 + 3072 * 12288 // 64 * 4 + 64
    assert linear_weight_bytes(nn.Linear(3072, 12288, device="meta", dtype=torch.bfloat16), "fp8") == (
        3072 * 12288 + 12288 * 4 + 12288 * 2
    )


# ----------------------------------------------------------------------------- save / load


def test_fp8_checkpoint_round_trip(tmp_path):
    engine = FluxEngine.from_pipe(
        _fresh_pipe(), EngineConfig(attention=AttentionConfig(backend="auto"), quant=QuantConfig(transformer="fp8"))
    )
    path = save_fp8_transformer(engine.transformer, tmp_path / "dit-fp8.safetensors")
    loaded = load_fp8_transformer(path, device="cpu", dtype=torch.float32)
    # fused qkv saved split into diffusers names: exact, the scales are per row
    fused = engine.transformer.transformer_blocks[1].qkv
    rows = loaded.transformer_blocks[1].attn.to_k
    k_rows = slice(rows.out_features, 2 * rows.out_features)  # [q; k; v]
    torch.testing.assert_close(rows.weight_fp8.float(), fused.weight_fp8[k_rows].float(), rtol=0, atol=0)
    torch.testing.assert_close(rows.weight_scale, fused.weight_scale[k_rows], rtol=0, atol=0)
    assert actual_weight_bytes(loaded) == weight_bytes(meta_component("tiny", "transformer", torch.float32), "fp8")
    # the loaded model makes the same images, and quantising again is skipped, not stacked
    pipe = _fresh_pipe()
    pipe.transformer = loaded
    again = FluxEngine.from_pipe(pipe, EngineConfig(quant=QuantConfig(transformer="fp8")))
    assert again.transformer.transformer_blocks[1].attn.to_k is rows
    expected = engine(**tiny_call_kwargs()).images
    assert psnr(again(**tiny_call_kwargs()).images, expected) >= 80  # same fp8 values; fp32 sum order differs


def test_loading_a_plain_file_as_fp8_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a flux-engine fp8 checkpoint"):
        load_fp8_transformer(tmp_path / "plain.safetensors")


# ----------------------------------------------------------------------------- quantise first, fuse after


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.element_size() == 1:  # fp8 / int8 / packed nf4: compare bytes
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


@pytest.mark.parametrize("mode", ["fp8", "fp8-weight", "int8-weight"])
def test_fusing_quantised_projections_equals_quantising_fused_ones(mode):
    """A quantised load (or checkpoint) is fused by the kernels presets after quantising; the result must be what
    the bf16 path (fuse, then quantise) makes: same module tree, same bytes, same output."""
    from engine.attention import apply_attention
    from engine.quant import quantize_model

    fused_first, quantised_first = _fresh_pipe(torch.bfloat16), _fresh_pipe(torch.bfloat16)
    config = EngineConfig(attention=AttentionConfig(backend="auto"), quant=QuantConfig(transformer=mode))
    apply_attention(fused_first, config.attention)
    quantize_model(fused_first.transformer, mode, record_sqnr=False)  # apply_quantization's step, without probes
    quantize_model(quantised_first.transformer, mode, record_sqnr=False)
    FluxEngine.from_pipe(quantised_first, config)  # fuses the quantised layers; quantising again is skipped
    expected, got = fused_first.transformer, quantised_first.transformer
    assert [(n, type(m).__name__) for n, m in got.named_modules()] == [
        (n, type(m).__name__) for n, m in expected.named_modules()
    ]
    assert type(got.single_transformer_blocks[1].linear1).__name__ in ("Fp8Linear", "QLinear")
    expected_state = expected.state_dict()
    assert all(_bytes_equal(v, expected_state[k]) for k, v in got.state_dict().items())
    x = torch.randn(2, 5, got.transformer_blocks[0].qkv.in_features, dtype=torch.bfloat16)
    for name in ("transformer_blocks.0.qkv", "transformer_blocks.1.txt_qkv", "single_transformer_blocks.0.linear1"):
        assert torch.equal(got.get_submodule(name)(x), expected.get_submodule(name)(x)), name


@pytest.mark.parametrize("double_quant", [False, True])
def test_fusing_nf4_projections_keeps_their_codes(double_quant):
    # bitsandbytes quantises on the CPU too: the layout (not the engine's nf4 mode, which stays CUDA-only) is
    # testable here. Per-block scales are per 64 elements within a row, so the fused codes are the same bytes.
    from engine.attention import fuse_linears
    from engine.quant.layers import _nf4_module, fuse_quantized_linears

    torch.manual_seed(0)
    linears = [nn.Linear(128, rows, dtype=torch.bfloat16) for rows in (128, 128, 256)]
    fused = fuse_quantized_linears([_nf4_module(linear, double_quant) for linear in linears], "block.qkv")
    expected = _nf4_module(fuse_linears(linears), double_quant)
    assert fused.weight.shape == expected.weight.shape and torch.equal(fused.weight.data, expected.weight.data)
    assert torch.equal(fused.bias, expected.bias)
    import bitsandbytes.functional as bnb_f

    got_weight = bnb_f.dequantize_4bit(fused.weight.data, fused.weight.quant_state).float()
    expected_weight = bnb_f.dequantize_4bit(expected.weight.data, expected.weight.quant_state).float()
    if double_quant:  # the 8-bit second-level scales are quantised again from the parts' (2^-8 relative)
        assert sqnr_db(got_weight, expected_weight) > 45
    else:
        assert torch.equal(fused.weight.quant_state.absmax, expected.weight.quant_state.absmax)
        assert torch.equal(got_weight, expected_weight)


def test_fusing_projections_quantised_differently_is_a_clear_error():
    from engine.quant import fuse_quantized_linears, quantized_linear

    linears = [nn.Linear(16, 16) for _ in range(3)]
    parts = [quantized_linear(linears[0], "fp8"), quantized_linear(linears[1], "int8-weight"), linears[2]]
    with pytest.raises(ConfigError, match="cannot fuse the projections of `blocks.0.qkv`: they are Fp8Linear, Linear"):
        fuse_quantized_linears(parts, "blocks.0.qkv")


def test_a_quantised_t5_still_moves_between_devices():
    # KeepsInputDtype's dtype marker was a meta tensor: `.to()` of the quantised T5 (pipe.to(device)) failed
    pipe = _fresh_pipe()
    apply_quantization(pipe, QuantConfig(text_encoder_2="fp8"))
    pipe.to("cpu")
    wo = pipe.text_encoder_2.encoder.block[0].layer[1].DenseReluDense.wo
    assert wo.weight.dtype == torch.float32 and wo.weight.numel() == 0 and wo.weight.device.type == "cpu"


@pytest.mark.parametrize("mode", ["fp8", "int8-weight"])
def test_a_weight_edited_after_quantising_is_refused_at_the_next_call(mode):
    """Before: `to_q.weight.mul_(-1)` (or `.data = W`) after optimize() on a quantised preset changed nothing (the
    fused placeholder's empty tensor, quanto's codes): diffusers' image moved by 0.015-0.16, ours by 0, without a
    word. Now the next call is refused; moving the pipeline (new tensors of the same shape) is not an edit."""
    from engine import optimize

    config = EngineConfig(attention=AttentionConfig(backend="auto"), quant=QuantConfig(transformer=mode))
    edits = {
        "to_q in place": lambda block: block.attn.to_q.weight.mul_(-1.0),
        "to_q given a weight": lambda block: setattr(block.attn.to_q.weight, "data", torch.randn(128, 128)),
    }
    if mode == "int8-weight":  # quanto's own layer (fp8's Fp8Linear has no `weight`: an edit fails there)
        edits["ff.net.2 in place"] = lambda block: block.ff.net[2].weight.mul_(-1.0)
    for edit in edits.values():
        pipe = optimize(_fresh_pipe(), config)
        pipe.to("cpu")
        pipe.to(torch.float32)
        expected = _images(pipe)
        assert torch.equal(_images(pipe), expected)
        with torch.no_grad():
            edit(pipe.transformer.transformer_blocks[0])
        with pytest.raises(ConfigError, match=r"transformer_blocks.0.* was changed after the engine quantised"):
            _images(pipe)


def test_the_weight_edit_guard_under_a_compile_of_the_whole_transformer():
    """Before: `pipe.transformer.compile()` (or torch.compile assigned back) on the int8-weight preset failed at the
    first call with a RecursionError: dynamo traced the guard's read of quanto's weight into its tensor subclass.
    The guard runs outside the compiled graph now, and still refuses an edit."""
    from engine import optimize

    config = EngineConfig(attention=AttentionConfig(backend="auto"), quant=QuantConfig(transformer="int8-weight"))
    pipe = optimize(_fresh_pipe(), config)
    expected = _images(pipe)
    pipe.transformer.compile(backend="aot_eager")
    torch.testing.assert_close(_images(pipe), expected, atol=1e-5, rtol=0)  # eager and traced sums' order
    with torch.no_grad():
        pipe.transformer.transformer_blocks[0].ff.net[2].weight.mul_(-1.0)
    with pytest.raises(ConfigError, match=r"transformer_blocks.0.* was changed after the engine quantised"):
        _images(pipe)


# ----------------------------------------------------------------------------- quantised pipeline folders


def _images(pipe) -> torch.Tensor:
    return pipe(**tiny_call_kwargs(num_inference_steps=1)).images


_FUSED_FP8 = EngineConfig(
    attention=AttentionConfig(backend="sdpa", fused_norms=True), quant=QuantConfig(transformer="fp8")
)


@pytest.fixture(scope="module")
def fused_fp8_engine():
    """The tiny pipeline on our fused kernels (Triton norms, interpreted on the CPU) with an fp8 transformer, and
    its images: the reference of the quantised-folder round trips."""
    engine = FluxEngine.from_pipe(_fresh_pipe(), _FUSED_FP8)
    return engine, _images(engine)


@pytest.mark.parametrize("fused_before_save", [True, False])
def test_quantised_folder_round_trip_with_the_fused_kernels(tmp_path, fused_fp8_engine, fused_before_save):
    """save_quantized from a fused+fp8 pipeline, or from an unfused fp8 one, then FluxEngine.from_pretrained with
    the fused-kernels config: the same images, bit for bit, and the fp8 weights are loaded, not quantised again."""
    from engine.quant import QUANT_MARKER, QUANT_WEIGHTS, save_quantized

    reference, expected = fused_fp8_engine
    unfused_fp8 = replace(_FUSED_FP8, attention=AttentionConfig())
    saved = reference if fused_before_save else FluxEngine.from_pipe(_fresh_pipe(), unfused_fp8)
    folder = save_quantized(saved, tmp_path / "flux-fp8")
    assert {p.name for p in (folder / "transformer").iterdir()} == {"config.json", QUANT_WEIGHTS, QUANT_MARKER}

    loaded = FluxEngine.from_pretrained(folder, config=_FUSED_FP8, device="cpu", dtype=torch.float32)
    assert isinstance(loaded.transformer.transformer_blocks[0].qkv, Fp8Linear)
    assert isinstance(loaded.transformer.transformer_blocks[0].attn.to_q, FusedAway)
    assert loaded.quant_state.components["transformer"].mode == "fp8"
    assert torch.equal(_images(loaded), expected)


# the fp8 projections that follow a LayerNorm+modulate or an MLP's GELU, by the end of their names
_FED_BY_A_KERNEL = (
    ".qkv", ".txt_qkv", ".linear1", ".ff.net.0.proj", ".ff_context.net.0.proj",  # after a norm kernel
    ".ff.net.2", ".ff_context.net.2", ".proj_out",  # after gelu_concat_fp8
)  # fmt: skip


def test_the_norm_kernels_feed_the_fp8_projections(fused_fp8_engine):
    """With fused norms, every fp8 projection after a LayerNorm+modulate or a GELU receives a kernel's e4m3 output
    (and no other layer does: the attention output projections, the adaLN linears); the images stay those of the
    unfused activation quantisation (fp32 pipeline: the two quantise the same fp32 values, up to the kernels'
    last-bit arithmetic) and of fp32 (the fp8 floor)."""
    engine, images = fused_fp8_engine
    fed, again = fp8_inputs_fed(engine, lambda: _images(engine))
    assert torch.equal(again, images)
    pre_quantised = sorted(name for name, two in fed.items() if two)
    assert pre_quantised == sorted(name for name in fed if name.endswith(_FED_BY_A_KERNEL))
    # 6 per double-stream block (qkv, txt_qkv, 2 MLP inputs, 2 MLP outputs), 2 per single (linear1, proj_out)
    transformer = engine.transformer
    assert len(pre_quantised) == 6 * len(transformer.transformer_blocks) + 2 * len(
        transformer.single_transformer_blocks
    )
    unfused = FluxEngine.from_pipe(_fresh_pipe(), replace(_FUSED_FP8, quant=QuantConfig("fp8", fp8_fused_input=False)))
    assert not any(m.takes_fp8_input for m in unfused.transformer.modules() if isinstance(m, Fp8Linear))
    assert psnr(images, _images(unfused)) >= 50.0  # measured: 135 dB; 50 allows a few more code flips
    assert psnr(images, _images(FluxPipeline(**synthetic_components("tiny", dtype=torch.float32, seed=0)))) >= 45.0


def test_the_fused_path_steps_aside_where_it_would_change_behaviour():
    """No pre-quantised input where the fused kernels would compute something else or skip something: a non-tanh
    GELU (double-stream MLP, single-stream act_mlp), or hooks on the FeedForward (calling its parts directly
    would skip them). The images stay those of the same model without the fusion."""
    from engine.attention import EngineDoubleBlock

    def build(fused_input: bool):
        quant = QuantConfig("fp8", fp8_fused_input=fused_input)
        engine = FluxEngine.from_pipe(_fresh_pipe(), replace(_FUSED_FP8, quant=quant))
        blocks = engine.transformer.transformer_blocks
        assert isinstance(blocks[0], EngineDoubleBlock)
        blocks[0].ff.net[0].approximate = "none"
        engine.transformer.single_transformer_blocks[0].act_mlp.approximate = "none"
        return engine

    engine = build(True)
    hook_calls = []
    engine.transformer.transformer_blocks[1].ff_context.register_forward_pre_hook(lambda m, a: hook_calls.append(1))
    fed = {}
    for name, module in engine.transformer.named_modules():
        if isinstance(module, Fp8Linear):
            module.register_forward_pre_hook(lambda module, args, name=name: fed.__setitem__(name, len(args) == 2))
    images = _images(engine)
    assert hook_calls, "the FeedForward's hook did not run"
    assert not fed["transformer_blocks.0.ff.net.2"] and not fed["single_transformer_blocks.0.proj_out"]
    assert not fed["transformer_blocks.1.ff_context.net.0.proj"] and not fed["transformer_blocks.1.ff_context.net.2"]
    assert fed["transformer_blocks.0.ff.net.0.proj"] and fed["single_transformer_blocks.1.proj_out"]
    assert psnr(images, _images(build(False))) >= 50.0


def test_fp8_options_reach_every_fp8_layer():
    engine = FluxEngine.from_pipe(_fresh_pipe(), EngineConfig(quant=QuantConfig("fp8", fp8_fast_accum=True)))
    layers = [m for m in engine.transformer.modules() if isinstance(m, Fp8Linear)]
    assert layers and all(m.fast_accum and m.fused_input for m in layers)
    assert "fast_accum=True" in repr(layers[0])
    # the emulation has no fast accumulation: the CPU images are the default config's
    plain = FluxEngine.from_pipe(_fresh_pipe(), EngineConfig(quant=QuantConfig("fp8")))
    assert not any(m.fast_accum for m in plain.transformer.modules() if isinstance(m, Fp8Linear))
    assert torch.equal(_images(engine), _images(plain))


def _quantized_pipe(**modes) -> FluxPipeline:
    from engine.quant import quantize_model

    pipe = _fresh_pipe()
    for component, mode in modes.items():  # apply_quantization's step, without the SQNR probes
        quantize_model(getattr(pipe, component), mode, component, record_sqnr=False)
    return pipe


def test_save_quantized_refuses_what_it_cannot_write(tmp_path):
    from engine.quant import save_quantized

    with pytest.raises(ConfigError, match="not quantised. Save it with pipe.save_pretrained"):
        save_quantized(_fresh_pipe(), tmp_path / "a")
    int8 = _quantized_pipe(transformer="int8-weight")
    with pytest.raises(ConfigError, match="quantised as 'int8-weight' is not supported yet; use 'fp8'"):
        save_quantized(int8, tmp_path / "b")
    with pytest.raises(ConfigError, match="quantised as 'int8-weight' is not supported yet; use 'fp8'"):
        save_fp8_transformer(int8.transformer, tmp_path / "b.safetensors")
    with pytest.raises(ConfigError, match="text_encoder_2 is quantised as 'fp8'.*quant=QuantConfig"):
        save_quantized(_quantized_pipe(transformer="fp8", text_encoder_2="fp8"), tmp_path / "c")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("")
    with pytest.raises(ConfigError, match="exists and is not empty: pass a new path"):
        save_quantized(_quantized_pipe(transformer="fp8"), tmp_path / "d")


def test_a_quantised_folder_refuses_another_mode(tmp_path):
    from engine.models import load_local_components
    from engine.quant import save_quantized

    folder = save_quantized(_quantized_pipe(transformer="fp8"), tmp_path / "flux-fp8")
    with pytest.raises(ConfigError, match="saved quantised as 'fp8'; the config asks 'int8-weight'"):
        load_local_components(folder, "cpu", torch.float32, quant=QuantConfig(transformer="int8-weight"))
    # T5 quantised while loading beside the saved fp8 transformer
    loaded = load_local_components(folder, "cpu", torch.float32, quant=QuantConfig(text_encoder_2="int8-weight"))
    assert type(loaded["transformer"].proj_out) is nn.Linear
    assert isinstance(loaded["transformer"].transformer_blocks[0].attn.to_q, Fp8Linear)
    assert type(loaded["text_encoder_2"].encoder.block[0].layer[0].SelfAttention.q).__name__ == "QLinear"


# ----------------------------------------------------------------------------- compile


@pytest.mark.parametrize("fused_norms", [False, True], ids=["diffusers-blocks", "fused-norms-fp8-outputs"])
def test_fp8_blocks_compile_fullgraph_without_recompiles(fused_norms):
    config = EngineConfig(
        attention=AttentionConfig(backend="sdpa", fused_norms=fused_norms),
        quant=QuantConfig(transformer="fp8"),
        compile=CompileConfig(mode="regional", backend="eager"),
    )
    engine = FluxEngine.from_pipe(_fresh_pipe(), config)
    torch._dynamo.reset()
    counters.clear()
    engine(**tiny_call_kwargs(height=64, width=64))
    with torch._dynamo.config.patch(error_on_recompile=True):
        engine(**tiny_call_kwargs(height=48, width=80))
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] >= 4


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_scaled_mm_path_matches_the_emulation_at_flux_shapes():
    device = torch.device("cuda")
    if torch.cuda.get_device_capability(device) < (8, 9):
        pytest.skip("needs FP8 tensor cores (compute capability 8.9+)")
    torch.manual_seed(0)
    linear = nn.Linear(3072, 3072, device=device, dtype=torch.bfloat16)
    x = torch.randn(4608, 3072, device=device, dtype=torch.bfloat16)
    layer = Fp8Linear.from_linear(linear)
    assert layer.compute == "scaled_mm"
    got = layer(x)
    emulated = fp8_linear(x, layer.weight_fp8, layer.weight_scale, layer.bias, "emulate")
    assert sqnr_db(got.float(), emulated.float()) > 45  # same fp8 values, both bf16-rounded
    assert sqnr_db(got.float(), linear(x).float()) >= 25.0


@pytest.mark.gpu
def test_pre_quantised_input_and_fast_accumulation_on_gpu():
    """The norm kernel's e4m3 output into _scaled_mm at a FLUX shape, with and without fast accumulation."""
    from flux_kernels.layernorm_modulate import layernorm_modulate, layernorm_modulate_fp8

    device = torch.device("cuda")
    if torch.cuda.get_device_capability(device) < (8, 9):
        pytest.skip("needs FP8 tensor cores (compute capability 8.9+)")
    torch.manual_seed(0)
    linear = nn.Linear(3072, 9216, device=device, dtype=torch.bfloat16)
    x = torch.randn(1, 4608, 3072, device=device, dtype=torch.bfloat16) * 2 + 0.5
    shift, scale = (torch.randn(2, 1, 3072, device=device, dtype=torch.bfloat16) * 0.5).unbind(0)
    reference = linear(layernorm_modulate(x, shift, scale))
    layer = Fp8Linear.from_linear(linear)
    fused = layer(*layernorm_modulate_fp8(x, shift, scale))
    unfused = layer(layernorm_modulate(x, shift, scale))
    assert sqnr_db(fused.float(), unfused.float()) > 30  # they differ by the bf16 rounding before quantising
    assert sqnr_db(fused.float(), reference.float()) >= 25.0
    layer.fast_accum = True
    fast = layer(*layernorm_modulate_fp8(x, shift, scale))
    assert sqnr_db(fast.float(), reference.float()) >= 25.0
    assert sqnr_db(fast.float(), fused.float()) > 30


@pytest.mark.gpu
def test_nf4_linear_sqnr_and_exact_bytes():
    device = torch.device("cuda")
    torch.manual_seed(0)
    linear = nn.Linear(3072, 12288, device=device, dtype=torch.bfloat16)
    x = torch.randn(512, 3072, device=device, dtype=torch.bfloat16)
    # NF4 has 16 levels: ~20 dB on Gaussian weights (bitsandbytes' NF4 paper); 15 dB leaves room for bf16
    assert layer_sqnr(linear, "nf4", x) >= 15.0
    for double_quant in (False, True):
        pipe = _fresh_pipe(dtype=torch.bfloat16, device=device)
        expected = weight_bytes(meta_component("tiny", "transformer"), "nf4", double_quant=double_quant)
        apply_quantization(pipe, QuantConfig(transformer="nf4", nf4_double_quant=double_quant))
        assert actual_weight_bytes(pipe.transformer) == expected


@pytest.mark.gpu
def test_fp8_and_nf4_tiny_pipelines_on_gpu():
    device = torch.device("cuda")
    reference = _fresh_pipe(torch.bfloat16, device)(**tiny_call_kwargs(generator=torch.Generator().manual_seed(0)))
    for mode in ("fp8", "nf4"):
        engine = FluxEngine.from_pipe(
            _fresh_pipe(torch.bfloat16, device), EngineConfig(quant=QuantConfig(transformer=mode))
        )
        images = engine(**tiny_call_kwargs(generator=torch.Generator().manual_seed(0))).images
        assert psnr(images.float(), reference.images.float()) >= 30.0
