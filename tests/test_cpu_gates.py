"""CPU gates: figures that must not grow past the values committed under benchmarks/gates/.

- weight_bytes.json: the weight bytes of every component of the real flux-dev config (built on the meta
  device: no memory, about a second) in every quantisation mode, nf4 also double-quantised.
- planner_peaks.json: the memory planner's predicted peak of every preset and of its plan for every budget,
  at 1024^2 and 2048^2.

A figure that grew fails and says which one, committed vs now and by how much; one that shrank passes with
a warning to commit the new figures (`python -m benchmarks.gates --update`), so that the gain is locked in.
"""

import json
import warnings

import pytest

from benchmarks.gates import (
    PLANNER_PEAKS_FILE,
    UPDATE_COMMAND,
    WEIGHT_BYTES_FILE,
    load_figures,
    measure_planner_peaks,
    measure_weight_bytes,
    weight_byte_keys,
)


def _format(value: float) -> str:
    if isinstance(value, int) and abs(value) >= 2**20:
        return f"{value:,} ({value / 2**30:.3f} GiB)"
    return f"{value:,}" if isinstance(value, int) else f"{value:.6g}"


def _change(before: float, now: float) -> str:
    difference = f"{now - before:+,}" if isinstance(now - before, int) else f"{now - before:+.6g}"
    return f"{difference}, {(now - before) / before:+.2%}" if before else difference


def check_not_grown(committed: dict, measured: dict, what: str) -> list[str]:
    """Assert that no measured figure exceeds its committed one and that both name the same figures.

    committed, measured: figure name -> number (bytes, GiB, ...). Every growth, every committed figure no
    longer measured and every measured figure with no committed value goes into one AssertionError. Figures
    that shrank pass: each gets a line in a warning suggesting to update the committed file; returns them.
    """
    grown, shrunk = [], []
    for key in [key for key in committed if key in measured]:
        before, now = committed[key], measured[key]
        line = f"{key}: committed {_format(before)}, now {_format(now)} ({_change(before, now)})"
        if now > before:
            grown.append(line)
        elif now < before:
            shrunk.append(line)
    problems = []
    if grown:
        problems.append(f"{what} grew past the committed figures:\n  " + "\n  ".join(grown))
    missing = [key for key in committed if key not in measured]
    if missing:
        problems.append(
            f"{what}: committed figures no longer measured: {', '.join(missing)}; if they were dropped on purpose, "
            f"update the committed file ({UPDATE_COMMAND})"
        )
    new = [key for key in measured if key not in committed]
    if new:
        problems.append(
            f"{what}: measured figures with no committed value: {', '.join(new)}; update the committed file "
            f"({UPDATE_COMMAND}) and commit it"
        )
    if problems:
        raise AssertionError("\n".join(problems))
    if shrunk:
        note = f"{what} shrank:\n  " + "\n  ".join(shrunk) + f"\nlock the gain in: {UPDATE_COMMAND}, and commit"
        print(note)
        warnings.warn(note, UserWarning, stacklevel=2)
    return shrunk


# ----------------------------------------------------------------------------- weight bytes


@pytest.fixture(scope="module")
def measured_weight_bytes() -> dict[str, int]:
    return measure_weight_bytes()


def test_weight_bytes_have_not_grown(measured_weight_bytes):
    committed = load_figures(WEIGHT_BYTES_FILE)
    check_not_grown(committed, measured_weight_bytes, "weight bytes of flux-dev (meta device)")


def test_weight_bytes_cover_every_mode_and_follow_its_width(measured_weight_bytes):
    # a mode the count ignored would pass the gate unnoticed: each must be smaller than the one before it
    assert list(measured_weight_bytes) == weight_byte_keys()
    by_component: dict[str, dict[str, int]] = {}
    for key, value in measured_weight_bytes.items():
        component, mode = key.split("/")
        by_component.setdefault(component, {})[mode] = value
    for component, figure in by_component.items():
        for eight_bit in ("fp8", "fp8-weight", "int8-weight"):
            assert figure["none"] > figure[eight_bit] > figure["nf4"] > figure["nf4-dq"], (component, figure)


def test_update_writes_the_figures_the_gate_reads(measured_weight_bytes, tmp_path, monkeypatch):
    import benchmarks.gates.__main__ as gates_cli

    target = tmp_path / "weight_bytes.json"
    monkeypatch.setattr(gates_cli, "WEIGHT_BYTES_FILE", target)
    monkeypatch.setattr(gates_cli, "PLANNER_PEAKS_FILE", tmp_path / "planner_peaks.json")
    monkeypatch.setattr(gates_cli, "measure_weight_bytes", lambda: dict(measured_weight_bytes))
    monkeypatch.setattr(gates_cli, "measure_planner_peaks", lambda: {"plan-6gib/1024": 1})
    assert gates_cli.main([]) == 0
    assert not target.exists()  # without --update it only prints
    assert gates_cli.main(["--update"]) == 0
    payload = json.loads(target.read_text())
    assert payload["generated_by"] == UPDATE_COMMAND and payload["generated_at"] and payload["what"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_not_grown(load_figures(target), measured_weight_bytes, "weight bytes") == []


# ----------------------------------------------------------------------------- planner peaks


def test_planner_peaks_have_not_grown():
    committed = load_figures(PLANNER_PEAKS_FILE)
    check_not_grown(committed, measure_planner_peaks(), "planner's predicted peaks (flux-dev)")


# ----------------------------------------------------------------------------- the gate logic itself


COMMITTED = {"transformer/fp8": 11_980_728_448, "transformer/nf4": 6_791_144_448, "peak_gib/1024": 17.5}


def test_equal_figures_pass_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_not_grown(COMMITTED, dict(COMMITTED), "synthetic") == []


def test_a_growth_fails_naming_the_figure_both_values_and_the_change():
    measured = {**COMMITTED, "transformer/nf4": COMMITTED["transformer/nf4"] + 67_911_444}
    with pytest.raises(AssertionError) as failure:
        check_not_grown(COMMITTED, measured, "synthetic weight bytes")
    message = str(failure.value)
    assert "synthetic weight bytes grew past the committed figures" in message
    expected = (
        "transformer/nf4: committed 6,791,144,448 (6.325 GiB), now 6,859,055,892 (6.388 GiB) (+67,911,444, +1.00%)"
    )
    assert expected in message
    assert "transformer/fp8" not in message


def test_every_growth_is_reported_at_once_even_with_shrinks_beside():
    measured = {"transformer/fp8": COMMITTED["transformer/fp8"] + 1, "transformer/nf4": 1, "peak_gib/1024": 18.0}
    with pytest.raises(AssertionError) as failure:
        check_not_grown(COMMITTED, measured, "synthetic")
    message = str(failure.value)
    expected = "transformer/fp8: committed 11,980,728,448 (11.158 GiB), now 11,980,728,449 (11.158 GiB) (+1, +0.00%)"
    assert expected in message
    assert "peak_gib/1024: committed 17.5, now 18 (+0.5, +2.86%)" in message
    assert "transformer/nf4" not in message  # it shrank: not a failure


def test_a_shrink_passes_with_a_note_to_update_the_file():
    measured = {**COMMITTED, "peak_gib/1024": 16.0}
    with pytest.warns(UserWarning, match="synthetic shrank") as notes:
        shrunk = check_not_grown(COMMITTED, measured, "synthetic")
    assert shrunk == ["peak_gib/1024: committed 17.5, now 16 (-1.5, -8.57%)"]
    assert UPDATE_COMMAND in str(notes[0].message)


def test_a_committed_figure_no_longer_measured_is_an_error():
    measured = {key: value for key, value in COMMITTED.items() if key != "transformer/nf4"}
    with pytest.raises(AssertionError, match="committed figures no longer measured: transformer/nf4"):
        check_not_grown(COMMITTED, measured, "synthetic")


def test_a_new_figure_is_an_error_that_says_to_update_the_file():
    measured = {**COMMITTED, "transformer/int4": 3_000_000_000}
    with pytest.raises(AssertionError) as failure:
        check_not_grown(COMMITTED, measured, "synthetic")
    message = str(failure.value)
    assert "measured figures with no committed value: transformer/int4" in message
    assert f"update the committed file ({UPDATE_COMMAND})" in message
