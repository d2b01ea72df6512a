"""`python -m engine.bench`: the baseline diffusers FluxPipeline and the engine, side by side in one run.

Per resolution and config: ms per transformer step (median over the timed runs, CUDA events on a
GPU), TFLOP/s from the flop counter, end-to-end seconds split into encode / denoise / decode,
speed-up vs the baseline of the same run, peak VRAM (torch allocated / reserved, NVML used) and
fidelity vs the baseline (image PSNR, final-latent relative error). Writes the table as JSON with
the card, driver, versions, commit and date, a CSV and a plot.

    engine.bench.cli        the command line: arguments, then (after parsing) the run and its report
    engine.bench.arguments  the checks of the arguments that need no model and no torch
    engine.bench.plan       what a run will do, decided and checked before anything heavy is built
    engine.bench.phases     one call's phases timed, the peak inside each, a step's FLOPs
    engine.bench.run        the measurement: one row per config and size
    engine.bench.report     tables, JSON / CSV / PNG files, the verdict lines

This package imports nothing heavy itself, so that `--help` and argument errors answer before torch loads.
"""
