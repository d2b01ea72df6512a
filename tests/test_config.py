import dataclasses

import pytest

from engine.config import (
    PRESETS,
    AttentionConfig,
    EngineConfig,
    QuantConfig,
    parse_resolution,
    preset,
    resolve_config,
    validate_resolution,
    validate_steps,
)
from engine.errors import ConfigError, ResolutionError


def test_default_config_is_the_baseline():
    assert EngineConfig().is_baseline
    assert EngineConfig().label == "baseline"
    assert preset("baseline").is_baseline
    assert resolve_config(None) == PRESETS["baseline"]


def test_configs_are_frozen():
    config = EngineConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.name = "changed"


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown preset 'fastest'.*baseline"):
        preset("fastest")


def test_unimplemented_values_are_rejected_with_the_allowed_set():
    with pytest.raises(ConfigError, match=r"attention.backend=.flash3. is not one of .sdpa., .triton., .auto."):
        AttentionConfig(backend="flash3")
    with pytest.raises(ConfigError, match=r"quant.transformer='int2'"):
        QuantConfig(transformer="int2")


def test_parts_must_have_their_type():
    with pytest.raises(ConfigError, match="EngineConfig.attention must be a AttentionConfig"):
        EngineConfig(attention="sdpa")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1024", (1024, 1024)), ("1360x768", (768, 1360)), (" 832X1216 ", (1216, 832))],
)
def test_parse_resolution_is_width_by_height(text, expected):
    assert parse_resolution(text) == expected


@pytest.mark.parametrize("text", ["", "big", "10x", "x10", "1024x768x2"])
def test_parse_resolution_rejects_non_sizes(text):
    with pytest.raises(ResolutionError, match="WIDTHxHEIGHT"):
        parse_resolution(text)


def test_resolution_not_multiple_of_16_names_the_nearest_sizes():
    with pytest.raises(ResolutionError, match="height 1000 is not a multiple of 16; use 992 or 1008"):
        validate_resolution(1000, 1024)
    with pytest.raises(ResolutionError, match="width 770 is not a multiple of 16; use 768 or 784"):
        validate_resolution(1024, 770)


def test_resolution_range_and_opt_in():
    with pytest.raises(ResolutionError, match=r"width 4096 is outside 256\.\.2048.*--allow-any-size"):
        validate_resolution(1024, 4096)
    validate_resolution(1024, 4096, allow_any_size=True)
    validate_resolution(256, 2048)
    with pytest.raises(ResolutionError, match="too small"):
        validate_resolution(0, 64, allow_any_size=True)


def test_steps_must_be_positive():
    validate_steps(1)
    with pytest.raises(ConfigError, match="steps 0 must be at least 1"):
        validate_steps(0)
