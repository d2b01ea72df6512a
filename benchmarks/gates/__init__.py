"""CPU gates: figures that must not grow past their committed values (tests/test_cpu_gates.py checks them).

weight_bytes.json: engine.memory.weights.weight_bytes of each component of the real flux-dev config, built on the
meta device, in every quantisation mode (nf4 also with double quantisation), as "component/mode" -> bytes.
planner_peaks.json: engine.memory.planner's predicted peak (bytes) of every preset at 1024^2 and 2048^2, as
"preset/size" -> bytes, and of the plan it picks for each budget, as "plan-<N>gib/size" -> bytes.
Regenerate them after a change that is meant to move these figures, and commit them with that change:

    python -m benchmarks.gates --update
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

GATES_DIR = Path(__file__).resolve().parent
WEIGHT_BYTES_FILE = GATES_DIR / "weight_bytes.json"
PLANNER_PEAKS_FILE = GATES_DIR / "planner_peaks.json"
PLANNER_SIZES = (1024, 2048)
PLANNER_BUDGETS = (6, 8, 12, 16, 24, 48)
VARIANT = "flux-dev"
UPDATE_COMMAND = "python -m benchmarks.gates --update"


def weight_byte_keys() -> list[str]:
    """Every "component/mode" figure of weight_bytes.json, nf4 double-quantised as "nf4-dq"."""
    from engine.config import QuantConfig

    modes = [*QuantConfig.MODES, "nf4-dq"]
    return [f"{component}/{mode}" for component in QuantConfig.COMPONENTS for mode in modes]


def measure_weight_bytes(variant: str = VARIANT) -> dict[str, int]:
    """Weight bytes of `variant` per component and mode: arithmetic on meta tensors, no memory, ~1 s."""
    from engine.memory.weights import meta_component, weight_bytes

    figures, models = {}, {}
    for key in weight_byte_keys():
        component, mode = key.split("/")
        if component not in models:
            models[component] = meta_component(variant, component)
        double_quant = mode == "nf4-dq"
        figures[key] = weight_bytes(models[component], "nf4" if double_quant else mode, component, double_quant)
    return figures


def measure_planner_peaks(variant: str = VARIANT) -> dict[str, int]:
    """The planner's predicted peak bytes: every preset, and the plan for every budget, at each size."""
    from engine.config import PRESETS
    from engine.memory.planner import plan, predict

    figures = {}
    for size in PLANNER_SIZES:
        for name, config in PRESETS.items():
            figures[f"{name}/{size}"] = predict(config, variant, size, size).peak_bytes
        for budget in PLANNER_BUDGETS:
            figures[f"plan-{budget}gib/{size}"] = plan(budget, size, size, variant=variant).chosen.peak_bytes
    return figures


def load_figures(path: Path) -> dict:
    """The figures of a committed gate file (its "figures" field)."""
    return json.loads(Path(path).read_text())["figures"]


def write_figures(path: Path, figures: dict, what: str) -> None:
    """Write a gate file: a header saying what the figures are and how they were made, then the figures."""
    from engine.measure import git_commit

    payload = {
        "what": what,
        "generated_by": UPDATE_COMMAND,
        "generated_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "figures": figures,
    }
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
