import copy
import json

import pytest

from engine.errors import EngineError
from engine.gate import (
    EXIT_CARD_MISMATCH,
    EXIT_OK,
    EXIT_REGRESSION,
    GateInputError,
    compare_results,
    load_result,
    parse_fraction,
)


def _result(gpu="NVIDIA H100 80GB HBM3", ms=100.0, gib=30.0, config="kernels"):
    row = {"config": config, "height": 1024, "width": 1024, "steps": 4, "batch": 1}
    return {"env": {"gpu": gpu}, "rows": [{**row, "ms_per_step": ms, "peak_allocated_gib": gib}]}


def test_a_slowdown_past_the_allowance_fails():
    report = compare_results(_result(ms=106.0), _result(ms=100.0), max_slowdown=0.05, max_vram_growth=0.03)
    assert report.code == EXIT_REGRESSION
    text = report.format()
    assert "GATE FAILED: 1 regression(s)" in text
    assert "ms_per_step" in text and "+6.0%" in text and "REGRESSION (allowed +5.0%)" in text


def test_a_slowdown_within_the_allowance_and_a_speedup_pass():
    assert compare_results(_result(ms=104.0), _result(ms=100.0), 0.05, 0.03).code == EXIT_OK
    report = compare_results(_result(ms=70.0), _result(ms=100.0), 0.05, 0.03)
    assert report.code == EXIT_OK and "-30.0%" in report.format()


def test_memory_growth_fails_on_its_own_threshold():
    report = compare_results(_result(gib=31.0), _result(gib=30.0), max_slowdown=0.05, max_vram_growth=0.03)
    assert report.code == EXIT_REGRESSION
    assert "peak_allocated_gib" in report.format()


def test_a_baseline_from_another_card_is_reported_not_compared():
    report = compare_results(_result(gpu="NVIDIA H200"), _result(), 0.05, 0.03)
    assert report.code == EXIT_CARD_MISMATCH
    assert "recorded on NVIDIA H100 80GB HBM3, this run is on NVIDIA H200" in report.message


def test_rows_match_like_with_like_only():
    current = _result(config="compile")
    report = compare_results(current, _result(config="kernels"), 0.05, 0.03)
    assert report.code == EXIT_CARD_MISMATCH and "no row of this run matches" in report.message
    both = copy.deepcopy(_result())
    both["rows"].append({**both["rows"][0], "config": "compile", "ms_per_step": 500.0})
    report = compare_results(both, _result(), 0.05, 0.03)
    assert report.code == EXIT_OK
    assert "not in the baseline (not gated): compile" in report.format()


def test_a_missing_field_is_an_error(tmp_path):
    broken = _result()
    del broken["rows"][0]["ms_per_step"]
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(GateInputError, match="row 0 lacks ms_per_step"):
        load_result(path)
    with pytest.raises(GateInputError, match="does not exist"):
        load_result(tmp_path / "none.json")
    path.write_text("{not json")
    with pytest.raises(GateInputError, match="not valid JSON"):
        load_result(path)


@pytest.mark.parametrize(("text", "value"), [("5%", 0.05), ("0.03", 0.03), (" 12.5% ", 0.125)])
def test_thresholds_parse(text, value):
    assert parse_fraction(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["five", "-1%"])
def test_bad_thresholds_are_refused(text):
    with pytest.raises(EngineError):
        parse_fraction(text)
