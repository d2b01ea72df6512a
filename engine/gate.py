"""Regression gates: compare a bench result with a stored baseline, like with like.

Rows are matched on (GPU name, config, height, width, steps, batch). A row regresses when its
ms/step grew by more than `max_slowdown` or its peak allocated memory by more than
`max_vram_growth` (fractions: 0.05 is 5%). Exit codes of `engine.bench --gate`:

    0  no regression            1  a regression
    3  the baseline was recorded on another card (nothing comparable)
    4  a file lacks a field the gate needs (a broken or foreign result)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import EngineError

EXIT_OK, EXIT_REGRESSION, EXIT_CARD_MISMATCH, EXIT_BAD_RESULT = 0, 1, 3, 4
KEY_FIELDS = ("config", "height", "width", "steps", "batch")
METRICS = ("ms_per_step", "peak_allocated_gib")


class GateInputError(EngineError):
    """A result file the gate cannot read: missing file, bad JSON, missing fields."""


def parse_fraction(text: str) -> float:
    """'5%' -> 0.05, '0.05' -> 0.05."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError as err:
        raise EngineError(f"threshold {text!r} is not a number; write 5% or 0.05") from err
    if value < 0:
        raise EngineError(f"threshold {text!r} is negative; a growth allowance is >= 0")
    return value


def load_result(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise GateInputError(f"baseline {str(path)!r} does not exist; record one with --save-baseline")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise GateInputError(f"{str(path)!r} is not valid JSON ({err})") from err
    validate_result(data, str(path))
    return data


def validate_result(data: dict, name: str) -> None:
    if not isinstance(data, dict) or "rows" not in data or "env" not in data:
        raise GateInputError(f"{name} is not an engine.bench result (no 'env' or 'rows')")
    if "gpu" not in data["env"]:
        raise GateInputError(f"{name}: env lacks 'gpu'")
    for index, row in enumerate(data["rows"]):
        missing = [f for f in (*KEY_FIELDS, *METRICS) if f not in row]
        if missing:
            raise GateInputError(f"{name}: row {index} lacks {', '.join(missing)}")


@dataclass
class Comparison:
    key: tuple
    metric: str
    baseline: float | None
    current: float | None
    limit: float

    @property
    def growth(self) -> float | None:
        if self.baseline in (None, 0) or self.current is None:
            return None
        return self.current / self.baseline - 1.0

    @property
    def regressed(self) -> bool:
        return self.growth is not None and self.growth > self.limit


@dataclass
class GateReport:
    code: int
    comparisons: list[Comparison]
    unmatched: list[tuple]
    message: str

    def format(self) -> str:
        lines = [self.message]
        if self.comparisons:
            lines.append(
                f"{'config':<28} {'size':>10} {'metric':<20} {'baseline':>10} {'now':>10} {'change':>8}  verdict"
            )
        for c in self.comparisons:
            config, height, width, *_ = c.key
            change = "-" if c.growth is None else f"{c.growth * 100:+.1f}%"
            verdict = "REGRESSION" if c.regressed else "ok"
            if c.regressed:
                verdict += f" (allowed +{c.limit * 100:.1f}%)"
            lines.append(
                f"{config:<28} {width}x{height:<5} {c.metric:<20} {_num(c.baseline):>10} {_num(c.current):>10} "
                f"{change:>8}  {verdict}"
            )
        for key in self.unmatched:
            lines.append(f"not in the baseline (not gated): {key[0]} {key[2]}x{key[1]} steps={key[3]} batch={key[4]}")
        return "\n".join(lines)


def _num(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _key(row: dict) -> tuple:
    return tuple(row[f] for f in KEY_FIELDS)


def compare_results(current: dict, baseline: dict, max_slowdown: float, max_vram_growth: float) -> GateReport:
    """Gate `current` against `baseline`; see the module doc for the codes."""
    validate_result(current, "the current result")
    validate_result(baseline, "the baseline")
    card_now, card_then = current["env"]["gpu"], baseline["env"]["gpu"]
    if card_now != card_then:
        return GateReport(
            EXIT_CARD_MISMATCH,
            [],
            [],
            f"baseline was recorded on {card_then or 'CPU'}, this run is on {card_now or 'CPU'}: nothing to compare; "
            "record a baseline on this card with --save-baseline",
        )
    previous = {_key(r): r for r in baseline["rows"]}
    limits = {"ms_per_step": max_slowdown, "peak_allocated_gib": max_vram_growth}
    comparisons, unmatched = [], []
    for row in current["rows"]:
        old = previous.get(_key(row))
        if old is None:
            unmatched.append(_key(row))
            continue
        for metric in METRICS:
            comparisons.append(Comparison(_key(row), metric, old[metric], row[metric], limits[metric]))
    if not comparisons:
        return GateReport(
            EXIT_CARD_MISMATCH, [], unmatched, "no row of this run matches the baseline (config, size, steps, batch)"
        )
    regressions = [c for c in comparisons if c.regressed]
    if regressions:
        message = f"GATE FAILED: {len(regressions)} regression(s) on {card_now or 'CPU'}"
        return GateReport(EXIT_REGRESSION, comparisons, unmatched, message)
    return GateReport(EXIT_OK, comparisons, unmatched, f"gate passed: {len(comparisons)} checks on {card_now or 'CPU'}")
