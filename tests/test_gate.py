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


# ----------------------------------------------------------------------------- what once passed without a word


def _two_rows(**changes):
    result = _result()
    result["rows"].append({**result["rows"][0], "height": 2048, "width": 2048, "ms_per_step": 400.0})
    result.update(changes)
    return result


@pytest.mark.parametrize("now", [{"ms_per_step": float("nan"), "error": "CUDA out of memory"},
                                 {"ms_per_step": None}, {"peak_allocated_gib": None}])  # fmt: skip
def test_a_row_that_failed_or_measured_nothing_is_a_regression(now):
    """Before: NaN > limit is False and None was 'ok', so a config that crashed passed the gate (exit 0)."""
    current = _result()
    current["rows"][0].update(now)
    report = compare_results(current, _result(), 0.05, 0.03)
    assert report.code == EXIT_REGRESSION
    assert ("FAILED in this run" if "error" in now else "NOT MEASURED in this run") in report.format()


def test_a_baseline_row_missing_from_the_run_is_a_regression():
    """Before: only the run's rows were looked at; a size or preset dropped from the CI command passed."""
    report = compare_results(_result(), _two_rows(), 0.05, 0.03)
    assert report.code == EXIT_REGRESSION
    assert "MISSING from this run (a regression): kernels 2048x2048 steps=4 batch=1" in report.format()
    assert compare_results(_two_rows(), _two_rows(), 0.05, 0.03).code == EXIT_OK


@pytest.mark.parametrize(("field", "then", "now"), [
    ("model", "synthetic:flux-dev", "synthetic:flux-schnell"), ("task", "kontext", "text-to-image"),
    ("dtype", "fp32", "bf16"), ("lora", "synthetic:64", None), ("max_sequence_length", 512, 256),
    ("prompt", "a fox", "a cat"), ("step_cache", "taylorseer:5", None), ("baseline_cache", "fbcache:0.08", None),
])  # fmt: skip
def test_a_baseline_of_another_run_is_not_compared(field, then, now):
    """Before: only the GPU name was checked; a 3x slower baseline of another model, task or LoRA let a 2x regression
    pass."""
    baseline, current = _result(ms=300.0), _result(ms=200.0)
    baseline[field], current[field] = then, now
    if field == "step_cache":
        baseline["rows"][0]["denoise_s"] = 1.0
    report = compare_results(current, baseline, 0.05, 0.03)
    assert report.code == EXIT_CARD_MISMATCH
    assert f"{field}: baseline {then!r}, now {now!r}" in report.message


def test_a_result_from_before_the_task_and_lora_fields_compares_as_text_to_image_without_lora():
    current = _result()
    current.update(task="text-to-image", lora=None, step_cache=None, baseline_cache=None)
    assert compare_results(current, _result(), 0.05, 0.03).code == EXIT_OK


def test_another_card_size_or_cpu_is_not_compared():
    baseline, current = _result(), _result()
    baseline["env"]["gpu_memory_gib"], current["env"]["gpu_memory_gib"] = 79.2, 94.0
    assert compare_results(current, baseline, 0.05, 0.03).code == EXIT_CARD_MISMATCH
    baseline, current = _result(gpu=None), _result(gpu=None)
    baseline["env"]["cpu"], current["env"]["cpu"] = "x86_64", "aarch64"
    assert compare_results(current, baseline, 0.05, 0.03).code == EXIT_CARD_MISMATCH


@pytest.mark.parametrize("text", ["nan", "inf", "5", "1", "2.5"])
def test_thresholds_that_disable_the_gate_or_read_as_hundreds_of_percent_are_refused(text):
    with pytest.raises(EngineError, match="not a finite number|ambiguous: a bare number is a fraction"):
        parse_fraction(text)


def test_the_allowance_is_printed_when_the_gate_passes():
    assert "allowed: ms_per_step +500%, peak memory +3%" in compare_results(
        _result(), _result(), parse_fraction("500%"), 0.03).message  # fmt: skip


@pytest.mark.parametrize("row", [{"ms_per_step": 0.0}, {"ms_per_step": -1.0}, {"ms_per_step": None},
                                 {"peak_allocated_gib": 0.0}, {"ms_per_step": "fast"},
                                 {"error": "CUDA out of memory", "ms_per_step": float("nan")}])  # fmt: skip
def test_a_baseline_that_measured_nothing_is_refused(tmp_path, row):
    """Before: a baseline of 0, a negative, null (a config that failed when --save-baseline wrote it) made every
    later run pass, forever; a string crashed after the whole run."""
    baseline = _result()
    baseline["rows"][0].update(row)
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(baseline))
    with pytest.raises(GateInputError, match="record it again with --save-baseline|not a number"):
        load_result(path)


def test_broken_baseline_files_are_refused_with_the_file_error(tmp_path):
    path = tmp_path / "baseline.json"
    for text, message in [('{"env": null, "rows": []}', "no 'env' object"), ('{"env": {}, "rows": null}', "'rows'")]:
        path.write_text(text)
        with pytest.raises(GateInputError, match=message):
            load_result(path)
    path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(GateInputError, match="not valid JSON"):
        load_result(path)
    with pytest.raises(GateInputError, match="is a folder"):
        load_result(tmp_path)
    duplicated = _result()
    duplicated["rows"].append(dict(duplicated["rows"][0]))
    path.write_text(json.dumps(duplicated))
    with pytest.raises(GateInputError, match="two rows for kernels 1024x1024"):
        load_result(path)


def test_a_step_cache_run_is_gated_on_its_denoising_time():
    """Before: a cached run's ms/step is a skipped step's (0.04 ms against 984 for a full one): no slowdown of the
    full steps could show."""
    baseline, current = _result(ms=0.04), _result(ms=0.04)
    for result, seconds in ((baseline, 1.0), (current, 2.0)):
        result["step_cache"] = "static:0,1,4"
        result["rows"][0]["denoise_s"] = seconds
    report = compare_results(current, baseline, 0.05, 0.03)
    assert report.code == EXIT_REGRESSION and "denoise_s" in report.format()


def test_the_command_line_refuses_an_empty_gate_and_thresholds_without_one(capsys):
    from engine.bench import cli

    assert cli.main(["--gate", "", "--device", "cpu"]) == 2
    assert "--gate is empty" in capsys.readouterr().err
    assert cli.main(["--max-slowdown", "5%", "--device", "cpu"]) == 2
    assert "--max-slowdown set a threshold for --gate, which is not given" in capsys.readouterr().err


def test_a_run_that_fails_its_gate_does_not_overwrite_a_rolling_baseline(tmp_path, capsys):
    """`--gate X --save-baseline X` in CI: before, a run that failed the gate still wrote its slow figures as the next
    baseline, so the regression passed from the next run on. The diffusers row carries the LoRA it ran with."""
    from engine.bench import cli

    baseline = tmp_path / "gate.json"
    argv = ["--model", "synthetic:tiny", "--res", "64", "--steps", "1", "--runs", "1", "--device", "cpu",
            "--preset", "baseline", "--lora", "synthetic:4", "--out", str(tmp_path / "run.json")]  # fmt: skip
    assert cli.main([*argv, "--save-baseline", str(baseline)]) == 0
    recorded = json.loads(baseline.read_text())
    assert recorded["lora"] == "synthetic:4" and {row["lora"] for row in recorded["rows"]} == {"synthetic:4"}
    for row in recorded["rows"]:  # a baseline 1000x faster than this machine: the next run regresses
        row["ms_per_step"] /= 1000
    baseline.write_text(json.dumps(recorded))
    capsys.readouterr()
    assert cli.main([*argv, "--gate", str(baseline), "--save-baseline", str(baseline)]) == EXIT_REGRESSION
    assert "not saving the gate baseline" in capsys.readouterr().err
    assert json.loads(baseline.read_text()) == recorded


def test_the_image_gate_fails_a_config_whose_image_drifts_from_diffusers():
    """--min-psnr: the gate once looked at speed and memory only; an image at 6 dB from diffusers' passed."""
    from engine.gate import psnr_gate

    result = _two_rows()
    result["rows"][0]["psnr_db"], result["rows"][1]["psnr_db"] = 47.2, 6.0
    result["rows"].append({**result["rows"][0], "config": "diffusers", "psnr_db": None})
    code, lines = psnr_gate(result, 35.0, "diffusers")
    assert code == EXIT_REGRESSION and lines[0].startswith("IMAGE GATE FAILED: 1 row(s) below 35 dB")
    assert any("2048x2048" in line and "BELOW 35 dB" in line for line in lines)
    result["rows"][1]["psnr_db"] = "inf"  # as the JSON stores an identical image
    assert psnr_gate(result, 35.0, "diffusers")[0] == EXIT_OK
    result["rows"][1].update(psnr_db=None, error="CUDA out of memory")
    assert psnr_gate(result, 35.0, "diffusers")[0] == EXIT_REGRESSION


def test_the_image_gate_needs_the_diffusers_baseline(capsys):
    from engine.bench import cli

    assert cli.main(["--min-psnr", "35", "--no-baseline", "--device", "cpu"]) == 2
    assert "drop --no-baseline" in capsys.readouterr().err


def test_the_image_gate_on_a_run(tmp_path, capsys):
    from engine.bench import cli

    argv = ["--model", "synthetic:tiny", "--res", "64", "--steps", "1", "--runs", "1", "--device", "cpu",
            "--preset", "baseline", "--out", str(tmp_path / "run.json"), "--min-psnr", "35"]  # fmt: skip
    assert cli.main(argv) == 0  # the baseline preset is diffusers bit for bit: an infinite PSNR
    assert "image gate passed: 1 row(s) at >= 35 dB against diffusers" in capsys.readouterr().out


def test_a_baseline_of_nothing_comparable_is_replaced_by_a_rolling_run(tmp_path, capsys):
    """Review fix: `--gate X --save-baseline X` after a change of prompt (exit 3: nothing comparable) kept the old
    baseline forever while telling the user to record a new one; an old-format baseline (no top-level 'lora') still
    matches its rows."""
    from engine.bench import cli

    baseline = tmp_path / "gate.json"
    argv = ["--model", "synthetic:tiny", "--res", "64", "--steps", "1", "--runs", "1", "--device", "cpu",
            "--preset", "baseline", "--out", str(tmp_path / "run.json")]  # fmt: skip
    assert cli.main([*argv, "--save-baseline", str(baseline)]) == 0
    recorded = json.loads(baseline.read_text())
    with_lora = {**recorded, "lora": "synthetic:4", "rows": [{**r, "lora": "synthetic:4"} for r in recorded["rows"]]}
    # as the bench wrote a LoRA run before it named the run's LoRA: only the engine's rows labelled
    old_format = {key: value for key, value in with_lora.items() if key != "lora"}
    old_format["rows"] = [{**r, "lora": None if r["config"] == "diffusers" else r["lora"]} for r in with_lora["rows"]]
    assert compare_results(with_lora, old_format, 10.0, 10.0).code == EXIT_OK
    baseline.write_text(json.dumps({**recorded, "prompt": "another prompt"}))
    assert cli.main([*argv, "--gate", str(baseline), "--save-baseline", str(baseline)]) == EXIT_CARD_MISMATCH
    assert json.loads(baseline.read_text())["prompt"] == recorded["prompt"]  # replaced by this run
