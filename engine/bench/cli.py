"""engine.bench's command line: the arguments, parsed before anything heavy is imported (torch, diffusers), then
the run (engine.bench.run) and its report (engine.bench.report)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import add_model_arguments, end_parallel_run
from ..errors import EngineError
from ..files import write_with_fallback
from .arguments import check_arguments
from .report import (
    BASELINE_LABEL,
    BUDGET_COLUMNS,
    CPU_RESULTS,
    default_out_path,
    format_table,
    save_results,
    task_label,
    verdicts,
    write_json,
)

DEFAULT_PROMPT = "a photograph of an astronaut riding a horse on the moon, earth rising behind"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.bench",
        description="Baseline diffusers FluxPipeline (or the --task's class) vs flux-engine, side by side in one run.",
    )
    parser.add_argument(
        "--res",
        nargs="+",
        default=["1024"],
        help="image sizes: 1024 (square) or WIDTHxHEIGHT such as 1360x768; several allowed (default 1024)",
    )
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per image (default 4)")
    add_model_arguments(parser, several_presets=True)
    parser.set_defaults(preset=None)  # the fastest config for this machine, unless --vram is given alone
    parser.add_argument(
        "--runs", type=int, default=None, help="timed calls per config and size (default 3; 1 on a CPU)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="denoising steps of a warm-up call (default --steps; 1 on a CPU, where a step takes seconds)",
    )
    parser.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default: the variant's)")
    parser.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON path, with .csv and .png beside it (default benchmarks/results/bench-<card>-<date>.json; "
        f"{CPU_RESULTS}/ on a CPU, which git ignores)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the diffusers baseline (no ratio, no PSNR)")
    parser.add_argument("--gate", default=None, help="baseline result JSON: exit non-zero on a regression against it")
    parser.add_argument("--max-slowdown", default=None, help="allowed ms/step growth for --gate (default 5%%)")
    parser.add_argument("--max-vram-growth", default=None, help="allowed peak-memory growth for --gate (default 3%%)")
    parser.add_argument("--save-baseline", default=None, help="also write the result here, as a gate baseline")
    parser.add_argument(
        "--min-psnr", type=float, default=None, metavar="DB",
        help="fail (exit 1) when a config's image falls below DB of PSNR against diffusers' in the same run",
    )  # fmt: skip
    parser.add_argument(
        "--vram",
        default=None,
        help="GiB budgets, comma-separated (e.g. 12 or 6,8,12,16,24,48): per size, the planner's fastest config "
        "predicted to fit, run on this GPU capped to that budget (torch.cuda.set_per_process_memory_fraction); "
        "prints each plan and why. With --vram, --preset defaults to none",
    )
    parser.add_argument(
        "--quality",
        default="fp8",
        choices=("bf16", "fp8", "any"),
        help="--vram: the planner's fidelity floor (bf16 weights only; fp8 too (default); nf4 too)",
    )
    parser.add_argument(
        "--lora",
        default=None,
        help="an adapter on diffusers and on every engine config: a local .safetensors LoRA, or synthetic:RANK (random "
        "factors of that rank on every attention and MLP projection, by --seed, each changing its projection by 10%% "
        "of its weight's RMS); each config runs without it first; adds the hot-swap time",
    )
    parser.add_argument(
        "--cache",
        default=None,
        help="step caching on every engine config: fbcache:THRESHOLD (First-Block Cache), taylorseer:INTERVAL[:ORDER], "
        "static:STEP,STEP,...[:ORDER] (the full steps); each config runs uncached first (its fidelity reference), and "
        "diffusers runs its own hook of the same rule; the speed-up is then per image",
    )
    parser.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="context parallelism over this many GPUs, beside the same config on one GPU (launch with torchrun "
        "--nproc-per-node N -m engine.bench ... --gpus N); one preset, no diffusers baseline",
    )
    parser.add_argument("--no-single", action="store_true", help="--gpus: skip the one-GPU run (no ratio, no PSNR)")
    parser.add_argument(
        "--cp-chunks",
        type=int,
        default=None,
        help="--gpus: at most this many slices of each rank's heads, whose exchanges overlap attention "
        "(ParallelConfig.chunks; default 2; 1: no overlap)",
    )
    parser.add_argument(
        "--cp-priority",
        choices=("high", "normal"),
        default=None,
        help="--gpus: the exchanges' NCCL stream priority (ParallelConfig.comm_priority; default normal)",
    )
    parser.add_argument(
        "--parallel-timeout",
        type=float,
        default=1800.0,
        help="--gpus: seconds a rank waits in a collective before the run ends with an error (default 1800: the "
        "other ranks wait while rank 0 runs the one-GPU rows)",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="compile cache for compiled presets (default: a fresh one, to time a cold start)",
    )
    return parser


def check_gate_arguments(args) -> tuple[float, float]:
    """The gate's thresholds (5% and 3% by default). An empty --gate (an unset variable in a CI script) and a
    threshold without --gate are refused: either would leave the run ungated without a word."""
    from ..gate import parse_fraction

    if args.gate is not None and not args.gate.strip():
        raise EngineError("--gate is empty (an unset variable?); name the baseline result JSON, or drop --gate")
    parsed = parse_fraction(args.max_slowdown or "5%"), parse_fraction(args.max_vram_growth or "3%")
    thresholds = {"--max-slowdown": args.max_slowdown, "--max-vram-growth": args.max_vram_growth}
    given = [flag for flag, value in thresholds.items() if value is not None]
    if given and args.gate is None:
        raise EngineError(f"{' and '.join(given)} set a threshold for --gate, which is not given; add --gate BASELINE")
    if args.min_psnr is not None and (not 0 < args.min_psnr < float("inf") or args.no_baseline):
        raise EngineError(
            f"--min-psnr {args.min_psnr} needs a PSNR in dB > 0 (e.g. 35) and the diffusers baseline it is measured "
            "against" + (": drop --no-baseline" if args.no_baseline else "")
        )
    return parsed


def save_baseline(result: dict, path: Path, failed: list, gates_passed: bool) -> int:
    """--save-baseline: the result as the next gate's baseline, unless a row failed or a gate found a regression (a
    rolling baseline would keep it); a baseline of nothing comparable (exit 3) is replaced. The exit code's share: 0,
    or 2 when nothing could be written."""
    if failed or not gates_passed:
        why = f"{len(failed)} row(s) failed" if failed else "a gate found a regression"
        print(f"not saving the gate baseline {path}: {why} (the previous baseline stays)", file=sys.stderr)
        return 0
    saved = write_with_fallback(path, lambda target: write_json(target, result), "the gate baseline")
    if saved is not None:
        print(f"saved the gate baseline {saved}")
    return 0 if saved == path else 2


def main(argv: list[str] | None = None) -> int:
    return end_parallel_run(_main(argv))


def _main(argv: list[str] | None) -> int:
    from ..gate import EXIT_BAD_RESULT, EXIT_CARD_MISMATCH, GateInputError, compare_results, load_result, psnr_gate

    args = build_parser().parse_args(argv)
    try:
        thresholds = check_gate_arguments(args)
        gate_baseline = load_result(args.gate) if args.gate is not None else None
        check_arguments(args)
        from .plan import make_plan  # torch, diffusers: only once the arguments are known to be good
        from .run import run

        if args.gpus > 1:
            from .parallel import gpus_verdicts, run_parallel

            result = run_parallel(args)
            if result is None:
                return 0  # a rank other than 0: rank 0 reports
            plan, verdict_lines = None, gpus_verdicts(result)
        else:
            plan = make_plan(args)
            result = run(args, plan)
            verdict_lines = None
    except GateInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_RESULT
    except EngineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    env = result["env"]
    print(
        f"\n{result['model']}{task_label(result)} {result['dtype']} on {env['gpu'] or 'CPU'} | torch {env['torch']} | "
        f"diffusers {env['diffusers']} | commit {env['commit']} | {env['date']}"
    )
    print(format_table(result["rows"]))
    budget_rows = [r for r in result["rows"] if r.get("budget_gib") is not None]
    if budget_rows:
        how = ("peaks measured with the GPU capped to the budget" if env["gpu"] else
               "on the CPU nothing is capped: the plans the planner picks for each budget, run uncapped")  # fmt: skip
        print(f"\nplans under --vram budgets ({how}):")
        print(format_table(budget_rows, BUDGET_COLUMNS))
    requested = Path(args.out) if args.out else default_out_path(env)
    out = save_results(result, requested)
    if out is not None:
        print(f"wrote {out} (+ .csv, .png)")
    code = 0 if out == requested else 2
    failed = [r for r in result["rows"] if r.get("error")]
    report = compare_results(result, gate_baseline, *thresholds) if gate_baseline is not None else None
    if report is not None:
        print(report.format())
    image_code = 0
    if args.min_psnr is not None:
        image_code, lines = psnr_gate(result, args.min_psnr, BASELINE_LABEL)
        print("\n".join(lines))
    if args.save_baseline:  # after the gates: a run that failed one, or failed a row, is no baseline
        # nothing comparable (another card, another run: exit 3) keeps no baseline worth keeping: this run replaces it
        gates_passed = (report is None or report.code in (0, EXIT_CARD_MISMATCH)) and image_code == 0
        code = save_baseline(result, Path(args.save_baseline), failed, gates_passed) or code
    if failed:
        print(f"error: {len(failed)} row(s) failed: " + "; ".join(f"{r['config']} {r['width']}x{r['height']}"
                                                             for r in failed), file=sys.stderr)  # fmt: skip
    if report is not None or image_code:  # a gate's verdict first: 1 for a regression, 3 for nothing comparable
        return (report.code if report is not None else 0) or image_code or (2 if failed else code)
    if failed:
        return 2
    for line in verdict_lines if verdict_lines is not None else verdicts(result):
        print(line)
    return code
