"""engine/resolution.py: sizes as users write them, and the checks' errors with their fixes."""

import pytest

from engine.errors import ConfigError, ResolutionError
from engine.resolution import parse_resolution, validate_resolution, validate_steps


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


def test_steps_must_be_in_range():
    validate_steps(1)
    validate_steps(1000)
    for steps in (0, 1001, 28000):  # 28000: a typo of 28 would run for hours
        with pytest.raises(ConfigError, match=f"steps {steps} is outside 1..1000"):
            validate_steps(steps)
