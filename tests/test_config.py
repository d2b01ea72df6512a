import dataclasses

import pytest

from engine.config import (
    PRESETS,
    AttentionConfig,
    EngineConfig,
    QuantConfig,
    preset,
    resolve_config,
)
from engine.errors import ConfigError


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
