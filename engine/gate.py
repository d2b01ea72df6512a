"""Regression gates: compare a bench result with a stored baseline, like with like.

Two results are comparable when they ran the same thing on the same card: the run's model, task, dtype, prompt,
text length, LoRA and step caches (`RUN_FIELDS`), the GPU (name and memory; the CPU without one). Rows are matched on
(config, height, width, steps, batch) and their LoRA. A row regresses when its time grew by more than `max_slowdown`
(ms/step; with a step cache, the seconds of a call's denoising, since a skipped step's time says nothing) or its peak
allocated memory by more than `max_vram_growth` (fractions: 0.05 is 5%), when it failed or measured nothing where the
baseline has a figure, or when a row of the baseline is missing from the run. Exit codes of `engine.bench --gate`:

    0  no regression            1  a regression (slower, more memory, a failed or missing row)
    3  nothing comparable: the baseline was recorded on another card, of another run (model, task, dtype, prompt,
       LoRA, step cache), or no row of this run matches one of it
    4  a file the gate cannot use: missing, not JSON, lacking a field, a failed or unmeasured baseline row
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import EngineError

EXIT_OK, EXIT_REGRESSION, EXIT_CARD_MISMATCH, EXIT_BAD_RESULT = 0, 1, 3, 4
KEY_FIELDS = ("config", "height", "width", "steps", "batch")
METRICS = ("ms_per_step", "peak_allocated_gib")
CACHED_TIME = "denoise_s"  # the time gated for a run with a step cache (its rows have it, as every row does)
UNKNOWN = object()  # a field a (hand-made or older) result does not have: not compared
# what the run did, beside the card, with the value a result written before the field existed stands for
RUN_FIELDS = {
    "model": UNKNOWN, "task": "text-to-image", "dtype": UNKNOWN, "prompt": UNKNOWN, "max_sequence_length": UNKNOWN,
    "lora": UNKNOWN, "step_cache": None, "baseline_cache": None,
}  # fmt: skip


class GateInputError(EngineError):
    """A result file the gate cannot read: missing file, bad JSON, missing fields."""


def parse_fraction(text: str) -> float:
    """'5%' -> 0.05, '0.05' -> 0.05. A bare number of 1 or more is refused (is '5' 5% or 500%?), as is one that is not
    finite (NaN would let every regression pass)."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError as err:
        raise EngineError(f"threshold {text!r} is not a number; write 5% or 0.05") from err
    if not math.isfinite(value):
        raise EngineError(f"threshold {text!r} is not a finite number; write 5% or 0.05")
    if value < 0:
        raise EngineError(f"threshold {text!r} is negative; a growth allowance is >= 0")
    if not raw.endswith("%") and value >= 1:
        raise EngineError(
            f"threshold {text!r} is ambiguous: a bare number is a fraction (it would allow {value * 100:g}%); write "
            f"{raw}% for {raw} percent, or {value * 100:g}% if that is what you mean"
        )
    return value


def load_result(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise GateInputError(f"baseline {str(path)!r} is a folder; name the result JSON in it")
    if not path.is_file():
        raise GateInputError(f"baseline {str(path)!r} does not exist; record one with --save-baseline")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GateInputError(f"{str(path)!r} is not valid JSON ({err})") from err
    validate_result(data, str(path), baseline=True)
    return data


def _measured(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def validate_result(data, name: str, baseline: bool = False) -> None:
    """GateInputError unless `data` is an engine.bench result with every field the gate reads. A baseline's rows must
    have run (no error) and measured a positive time; their peak memory may be null (a CPU run) but not 0 or negative:
    a baseline of nothing would let every later run pass."""
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not isinstance(data.get("env"), dict):
        raise GateInputError(f"{name} is not an engine.bench result (no 'env' object or 'rows' list)")
    if "gpu" not in data["env"]:
        raise GateInputError(f"{name}: env lacks 'gpu'")
    time_metric = time_metric_of(data)
    seen = set()
    for index, row in enumerate(data["rows"]):
        if not isinstance(row, dict):
            raise GateInputError(f"{name}: row {index} is not an object")
        missing = [f for f in (*KEY_FIELDS, *METRICS, time_metric) if f not in row]
        if missing:
            raise GateInputError(f"{name}: row {index} lacks {', '.join(dict.fromkeys(missing))}")
        for metric in (*METRICS, time_metric):
            value = row[metric]
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise GateInputError(f"{name}: row {index}'s {metric} is {value!r}, not a number")
        key = _key(row)
        if key in seen:
            raise GateInputError(f"{name}: two rows for {_describe(key)}; keep one (results are not merged)")
        seen.add(key)
        if baseline:
            peak = row["peak_allocated_gib"]
            if row.get("error") or not _measured(row[time_metric]) or not (peak is None or _measured(peak)):
                raise GateInputError(
                    f"{name}: row {index} ({_describe(key)}) "
                    + (f"failed when it was recorded ({row['error']})" if row.get("error") else
                       f"measured {time_metric}={row[time_metric]!r}, peak_allocated_gib={peak!r}")
                    + "; a baseline needs every row measured: record it again with --save-baseline"
                )  # fmt: skip


def time_metric_of(result: dict) -> str:
    """ms_per_step, or the denoising seconds of a call for a run with a step cache (a skipped step's time says
    nothing of a full one's)."""
    return CACHED_TIME if result.get("step_cache") else "ms_per_step"


@dataclass
class Comparison:
    key: tuple
    metric: str
    baseline: float | None
    current: float | None
    limit: float
    error: str | None = None  # the row failed in this run

    @property
    def growth(self) -> float | None:
        if not _measured(self.baseline) or not _measured(self.current):
            return None
        return self.current / self.baseline - 1.0

    @property
    def verdict(self) -> str:
        if self.error:
            return "FAILED in this run"
        if self.baseline is not None and not _measured(self.current):
            return "NOT MEASURED in this run"
        if self.growth is not None and self.growth > self.limit:
            return f"REGRESSION (allowed +{self.limit * 100:.1f}%)"
        return "ok" if self.growth is not None else "not compared (no baseline figure)"

    @property
    def regressed(self) -> bool:
        return self.verdict.startswith(("FAILED", "NOT MEASURED", "REGRESSION"))


@dataclass
class GateReport:
    code: int
    comparisons: list[Comparison]
    unmatched: list[tuple]
    message: str
    missing: list[tuple] = ()  # rows of the baseline this run did not make

    def format(self) -> str:
        lines = [self.message]
        if self.comparisons:
            lines.append(
                f"{'config':<28} {'size':>10} {'metric':<20} {'baseline':>10} {'now':>10} {'change':>8}  verdict"
            )
        for c in self.comparisons:
            config, height, width, *_ = c.key
            change = "-" if c.growth is None else f"{c.growth * 100:+.1f}%"
            lines.append(
                f"{config:<28} {width}x{height:<5} {c.metric:<20} {_num(c.baseline):>10} {_num(c.current):>10} "
                f"{change:>8}  {c.verdict}"
            )
        for key in self.missing:
            lines.append(f"MISSING from this run (a regression): {_describe(key)}")
        for key in self.unmatched:
            lines.append(f"not in the baseline (not gated): {_describe(key)}")
        return "\n".join(lines)


def _num(value) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.2f}"


def _key(row: dict, with_lora: bool = True) -> tuple:
    """A row's identity. Its LoRA counts where both results name the run's LoRA (a result written before they did
    labelled only the engine's rows, not diffusers')."""
    return (*(row[f] for f in KEY_FIELDS), row.get("lora") if with_lora else None)


def _describe(key: tuple) -> str:
    config, height, width, steps, batch, lora = key
    return f"{config} {width}x{height} steps={steps} batch={batch}" + (f" lora={lora}" if lora else "")


def _run_of(result: dict) -> dict:
    """What the run did and where, as the gate compares it (RUN_FIELDS, the card)."""
    env = result["env"]
    run = {field: result.get(field, absent) for field, absent in RUN_FIELDS.items()}
    run["gpu_memory_gib"] = env.get("gpu_memory_gib", UNKNOWN)
    if env.get("gpu") is None:
        run["cpu"] = env.get("cpu", UNKNOWN)
    return run


def compare_results(current: dict, baseline: dict, max_slowdown: float, max_vram_growth: float) -> GateReport:
    """Gate `current` against `baseline`; see the module doc for the codes."""
    validate_result(current, "the current result")
    validate_result(baseline, "the baseline", baseline=True)
    card_now, card_then = current["env"]["gpu"], baseline["env"]["gpu"]
    if card_now != card_then:
        return GateReport(
            EXIT_CARD_MISMATCH,
            [],
            [],
            f"baseline was recorded on {card_then or 'CPU'}, this run is on {card_now or 'CPU'}: nothing to compare; "
            "record a baseline on this card with --save-baseline",
        )
    run_now, run_then = _run_of(current), _run_of(baseline)
    differ = [f"{field}: baseline {then!r}, now {run_now[field]!r}" for field, then in run_then.items()
              if UNKNOWN not in (then, run_now[field]) and run_now[field] != then]  # fmt: skip
    if differ:
        return GateReport(
            EXIT_CARD_MISMATCH, [], [],
            "the baseline is of another run, so nothing is compared (" + "; ".join(differ) + "): run the same "
            "command as the baseline's, or record a baseline of this one with --save-baseline",
        )  # fmt: skip
    time_metric = time_metric_of(current)
    with_lora = "lora" in current and "lora" in baseline
    previous = {_key(r, with_lora): r for r in baseline["rows"]}
    limits = {time_metric: max_slowdown, "peak_allocated_gib": max_vram_growth}
    comparisons, unmatched, matched = [], [], set()
    for row in current["rows"]:
        key = _key(row, with_lora)
        old = previous.get(key)
        if old is None:
            unmatched.append(key)
            continue
        matched.add(key)
        for metric, limit in limits.items():
            comparisons.append(Comparison(key, metric, old[metric], row[metric], limit, row.get("error")))
    missing = [key for key in previous if key not in matched]
    if not comparisons:
        return GateReport(
            EXIT_CARD_MISMATCH, [], unmatched, "no row of this run matches the baseline (config, size, steps, batch, "
            "LoRA): run the baseline's sizes and presets, or record a baseline of this run", missing,
        )  # fmt: skip
    allowance = f"allowed: {time_metric} +{max_slowdown * 100:g}%, peak memory +{max_vram_growth * 100:g}%"
    regressions = [c for c in comparisons if c.regressed]
    if regressions or missing:
        message = (f"GATE FAILED: {len(regressions)} regression(s), {len(missing)} baseline row(s) missing, on "
                   f"{card_now or 'CPU'} ({allowance})")  # fmt: skip
        return GateReport(EXIT_REGRESSION, comparisons, unmatched, message, missing)
    message = f"gate passed: {len(comparisons)} checks on {card_now or 'CPU'} ({allowance})"
    return GateReport(EXIT_OK, comparisons, unmatched, message)


def psnr_gate(result: dict, min_psnr_db: float, baseline_label: str) -> tuple[int, list[str]]:
    """`--min-psnr`: every row's image against diffusers' in the same run must keep `min_psnr_db` (an image that
    drifts from diffusers' fails CI, as a slowdown does); the diffusers rows themselves (`baseline_label`) are skipped.
    A row that failed or has no PSNR fails. (code, lines)."""
    lines, failing = [], 0
    for row in result["rows"]:
        if row["config"] == baseline_label:
            continue
        value = row.get("psnr_db")
        value = float(value) if isinstance(value, (int, float, str)) and value != "" else None
        ok = value is not None and not math.isnan(value) and value >= min_psnr_db
        failing += not ok
        shown = "-" if value is None or math.isnan(value) else f"{value:.1f} dB"
        verdict = "ok" if ok else f"BELOW {min_psnr_db:g} dB" + (" (failed)" if row.get("error") else "")
        lines.append(f"{row['config']:<28} {row['width']}x{row['height']:<5} PSNR {shown:>9}  {verdict}")
    head = (f"IMAGE GATE FAILED: {failing} row(s) below {min_psnr_db:g} dB against diffusers" if failing else
            f"image gate passed: {len(lines)} row(s) at >= {min_psnr_db:g} dB against diffusers")  # fmt: skip
    return (EXIT_REGRESSION if failing else EXIT_OK), [head, *lines]
