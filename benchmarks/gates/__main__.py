"""python -m benchmarks.gates [--update]: print the gate figures measured now; --update also writes them as the
committed ones (benchmarks/gates/weight_bytes.json, planner_peaks.json). tests/test_cpu_gates.py compares them."""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks.gates import (
    PLANNER_PEAKS_FILE,
    VARIANT,
    WEIGHT_BYTES_FILE,
    measure_planner_peaks,
    measure_weight_bytes,
    write_figures,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gates", description=__doc__)
    parser.add_argument(
        "--update", action="store_true", help=f"write {WEIGHT_BYTES_FILE.name} and {PLANNER_PEAKS_FILE.name}"
    )
    args = parser.parse_args(argv)
    gates = (
        (
            WEIGHT_BYTES_FILE,
            measure_weight_bytes,
            f"engine.memory.weights.weight_bytes of meta_component({VARIANT!r}, component), bf16, by component/mode",
        ),
        (
            PLANNER_PEAKS_FILE,
            measure_planner_peaks,
            f"engine.memory.planner's predicted peak bytes for {VARIANT}: preset/size, and plan-<budget>gib/size",
        ),
    )
    for path, measure, what in gates:
        measured = measure()
        print(json.dumps(measured, indent=2))
        if args.update:
            write_figures(path, measured, what)
            print(f"wrote {path}")
        else:
            print(f"(not written; --update writes them to {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
