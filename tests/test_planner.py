"""The memory planner's arithmetic and choices, on the real flux-dev config built on the meta device."""

import pytest

from engine.config import PRESETS, EngineConfig, OffloadConfig, QuantConfig, VaeConfig
from engine.errors import ConfigError
from engine.memory.planner import (
    GIB,
    RESERVE_GIB,
    component_bytes,
    fastest_config,
    plan,
    predict,
)
from engine.memory.weights import meta_component, weight_bytes

BUDGETS = (6, 8, 12, 16, 24, 48)
SIZES = ((1024, 1024), (2048, 2048))


@pytest.mark.parametrize("mode", ["none", "fp8", "nf4"])
@pytest.mark.parametrize("component", ["transformer", "text_encoder_2"])
def test_component_bytes_agree_with_quantize_accounting(mode, component):
    expected = weight_bytes(meta_component("flux-dev", component), mode, component)
    counted = component_bytes("flux-dev", component, mode)
    assert counted.total == expected
    assert 0 < counted.largest_block < counted.blocks < counted.total


def test_transformer_block_bytes_are_the_double_block():
    # a FLUX double block holds ~340M parameters: 648 MiB in bf16, half in fp8 (+ per-row scales)
    bf16 = component_bytes("flux-dev", "transformer", "none")
    fp8 = component_bytes("flux-dev", "transformer", "fp8")
    assert bf16.largest_block == pytest.approx(648.2 * 2**20, rel=1e-3)
    assert fp8.largest_block == pytest.approx(bf16.largest_block / 2, rel=0.01)


def _peak(config, size=(1024, 1024)):
    return predict(config, "flux-dev", *size).peak_bytes


def test_each_policy_holds_less_than_the_one_before():
    peaks = [_peak(EngineConfig(offload=OffloadConfig(policy))) for policy in ("none", "model", "block", "leaf")]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == 4
    # 'none' holds every weight: transformer 22.17 GiB + T5 9.12 + CLIP 0.23 + VAE 0.16
    assert peaks[0] / GIB > 31.6


def test_quantisation_and_tiling_lower_the_peak_and_size_raises_it():
    bf16 = EngineConfig(offload=OffloadConfig("block"))
    fp8 = EngineConfig(offload=OffloadConfig("block"), quant=QuantConfig("fp8"))
    tiled = EngineConfig(offload=OffloadConfig("block"), vae=VaeConfig("auto", 512, 64))
    assert _peak(fp8) < _peak(bf16)
    assert _peak(tiled, (2048, 2048)) < _peak(bf16, (2048, 2048))
    assert _peak(bf16, (1024, 1024)) < _peak(bf16, (1360, 768 + 512)) < _peak(bf16, (2048, 2048))


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("size", SIZES)
def test_every_budget_gets_a_plan_that_fits_and_is_the_fastest_that_does(budget, size):
    chosen = plan(budget, *size)
    assert chosen.chosen.peak_bytes <= (budget - RESERVE_GIB) * GIB
    fitting = [p for p in chosen.considered if p.fits]
    # the fastest, or within 3% of it with more faithful weights
    assert chosen.chosen.seconds_per_image <= 1.03 * min(p.seconds_per_image for p in fitting)
    assert chosen.config.name == f"plan-{budget:g}gib"


def test_plans_get_leaner_as_the_budget_shrinks():
    plans = [plan(b, 2048, 2048).chosen for b in BUDGETS]
    assert [p.peak_bytes for p in plans] == sorted(p.peak_bytes for p in plans)
    assert [round(p.seconds_per_image, 1) for p in plans] == sorted(
        (round(p.seconds_per_image, 1) for p in plans), reverse=True
    )


def test_t5_is_not_quantised_for_a_tenth_of_a_second():
    assert plan(12, 1024, 1024).config.quant.text_encoder_2 == "none"


def test_a_big_card_runs_without_offload_and_a_small_one_streams():
    assert plan(80, 1024, 1024).config.offload.policy == "none"
    small = plan(8, 2048, 2048).config
    assert small.offload.streams
    assert small.compile.mode == "regional"


def test_quality_bf16_never_quantises():
    for budget in (8, 16):
        config = plan(budget, 1024, 1024, quality="bf16").config
        assert config.quant.transformer == "none" and config.quant.text_encoder_2 == "none"


def test_no_fp8_hardware_means_no_fp8():
    config = plan(16, 1024, 1024, fp8_hardware=False).config
    assert "fp8" not in (config.quant.transformer, config.quant.text_encoder_2)


def test_an_impossible_budget_names_the_leanest_need():
    with pytest.raises(ConfigError, match=r"nothing fits 1 GiB at 2048x2048.*needs \d+\.\d+ GiB"):
        plan(1, 2048, 2048)


@pytest.mark.parametrize("bad", [0, -4])
def test_budget_must_be_positive(bad):
    with pytest.raises(ConfigError, match="must be > 0"):
        plan(bad)


def test_quality_is_validated():
    with pytest.raises(ConfigError, match="quality='best'"):
        plan(12, quality="best")


def test_for_budget_returns_the_plans_config():
    import engine

    config = engine.for_budget(12, 1024, 1024)
    assert config == plan(12, 1024, 1024).config
    assert "plan for 12 GiB" in plan(12, 1024, 1024).explain()


# ----------------------------------------------------------------------------- the bench's default config


def test_the_fastest_preset_on_a_big_fp8_card_is_fp8_fastacc_with_cuda_graphs():
    choice = fastest_config("cuda", [(2048, 2048)], card_gib=139.8, fp8_hardware=True, triton=True)
    assert choice.config.name == "fp8-compile-fastacc-cudagraphs"
    assert "fastest preset measured on H100/H200" in choice.reason


def test_without_fp8_tensor_cores_the_fastest_is_bf16_kernels_compile():
    choice = fastest_config("cuda", [(1024, 1024)], card_gib=80.0, fp8_hardware=False, triton=True)
    assert choice.config.name == "kernels-compile"
    assert "fp8-compile-fastacc-cudagraphs (needs FP8 tensor cores, sm >= 8.9)" in choice.reason


def test_a_card_too_small_for_every_preset_gets_the_planners_plan():
    choice = fastest_config("cuda", [(1024, 1024), (2048, 2048)], card_gib=16.0, fp8_hardware=True, triton=True)
    assert choice.config.name == "plan-16gib"
    assert choice.config.offload.policy != "none"  # what fits 16 GiB streams
    assert predict(choice.config, "flux-dev", 2048, 2048).peak_gib + RESERVE_GIB <= 16.0
    assert "no preset fits this GPU's 16.0 GiB at 2048x2048" in choice.reason


def test_a_preset_is_skipped_when_a_size_asked_for_does_not_fit():
    # fp8-compile-fastacc-cudagraphs is predicted at 25.8 GiB at 1024^2 and 32.9 GiB at 2048^2 (with the reserve):
    # on a 30 GiB card it runs 1024^2 alone, but not a run that also asks for 2048^2
    fastest = "fp8-compile-fastacc-cudagraphs"
    assert predict(PRESETS[fastest], "flux-dev", 1024, 1024).peak_gib + RESERVE_GIB < 30.0
    assert predict(PRESETS[fastest], "flux-dev", 2048, 2048).peak_gib + RESERVE_GIB > 30.0
    small = fastest_config("cuda", [(1024, 1024)], card_gib=30.0, fp8_hardware=True, triton=True)
    both = fastest_config("cuda", [(1024, 1024), (2048, 2048)], card_gib=30.0, fp8_hardware=True, triton=True)
    assert small.config.name == fastest
    assert both.config.name != fastest
    # every preset is predicted past 30 GiB at 2048^2 (fp8 32.9, bf16 43.9): the planner's plan for the card
    assert both.config.name == "plan-30gib"
    assert predict(both.config, "flux-dev", 2048, 2048).peak_gib + RESERVE_GIB <= 30.0


def test_on_a_cpu_the_fastest_preset_is_the_tiled_vae():
    choice = fastest_config("cpu", [(2048, 2048)], variant="tiny")
    assert choice.config.name == "tiled-vae" and choice.config.vae.tiling == "auto"


@pytest.mark.parametrize("mode", ["none", "fp8"])
def test_controlnet_bytes_agree_with_quantize_accounting(mode):
    """FluxControlNetPipeline's ControlNet (the real 5 + 10 block layout) counted as the engine quantises it."""
    expected = weight_bytes(meta_component("flux-dev", "controlnet"), mode, "controlnet")
    counted = component_bytes("flux-dev", "controlnet", mode)
    assert counted.total == expected
    # 5 double + 10 single blocks of flux-dev's: 5 x 648 MiB + 10 x ~270 MiB in bf16, ~6 GiB in all
    assert 0 < counted.largest_block < counted.blocks < counted.total
    assert 5.5 * GIB < component_bytes("flux-dev", "controlnet", "none").total < 7 * GIB


@pytest.mark.parametrize("policy", ["none", "block"])
def test_a_controlnet_task_holds_the_controlnet_and_its_residuals(policy):
    """The planner used to predict FluxControlNetPipeline as text-to-image: ~6 GiB short in bf16 without offload."""
    config = EngineConfig(offload=OffloadConfig(policy))
    plain = predict(config, "flux-dev", 1024, 1024)
    control = predict(config, "flux-dev", 1024, 1024, task="controlnet")
    net = component_bytes("flux-dev", "controlnet", "none")
    streamed = net.blocks - config.offload.blocks_resident * net.largest_block
    resident = net.total if policy == "none" else net.total - streamed
    residuals = 15 * 4096 * 3072 * 2  # one [4096 image tokens, 3072] bf16 sample per ControlNet block
    assert control.parts["denoise"] - plain.parts["denoise"] == resident + residuals
    # 15 blocks beside the transformer's 57, weighed by their bytes: 26% more compute per step
    assert 1.2 < control.seconds_per_image / plain.seconds_per_image < 1.35


def test_the_planner_fits_a_controlnet_where_text_to_image_would_not_need_it():
    """At a budget where text-to-image fits a resident fp8 transformer, the ControlNet's weights push the plan to a
    leaner one, and every plan still fits."""
    for budget in (24, 32):
        plain = plan(budget, 1024, 1024, variant="flux-dev")
        control = plan(budget, 1024, 1024, variant="flux-dev", task="controlnet")
        assert control.chosen.peak_gib <= budget - RESERVE_GIB
        assert control.chosen.seconds_per_image >= plain.chosen.seconds_per_image
    configs = {task: [plan(b, 1024, 1024, variant="flux-dev", task=task).config for b in BUDGETS]
               for task in ("text-to-image", "controlnet")}  # fmt: skip
    assert configs["controlnet"] != configs["text-to-image"]
