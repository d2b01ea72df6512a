"""Where a preset's start-up seconds go: cold start, warm start and the first call at each new size, each in a
fresh process (issue "Our attention at the top", deliverable 4).

    python -m benchmarks.startup --preset fp8-compile-fastacc-cudagraphs --out results/startup.json

Each run is a child process of its own with its own cache folder (the engine's compile cache, Triton's kernel
cache and the kernels' tuning tables: $FLUX_ENGINE_CACHE_DIR, $TRITON_CACHE_DIR):
- cold: an empty folder; warm: the folder the cold run of the same mode filled; shipped: an empty folder, with the
  compile artefacts the cold run of the same mode saved found as shipped ones ($FLUX_ENGINE_SHIPPED_ARTIFACTS): a
  fresh machine's first process if the package shipped this card's artefacts (engine/compile.py); package: an empty
  folder and the artefacts the package ships (engine/compiled/): what a fresh machine's first process gets today;
- per tuning mode (FLUX_KERNELS_TUNING): `per-process` (every exact key timed in every process: the behaviour
  before flux_kernels.tuning) and `tables` (size classes, this card's shipped table, the machine's own).
A child calls the first size (compiling: its first call), then once more warm; then each further size once
(its first call) and once warm. Per call it reports seconds, and what happened inside: keys the kernels tuned and
their seconds, keys read from tables, graphs dynamo compiled and its compile seconds, CUDA graphs captured.
Start-up = a first call's seconds minus the warm call's at the same size (the engine.bench definition).
Synthetic FLUX.1-dev weights: start-up does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_SIZES = ["1024", "1360x768", "512", "832x1216", "2048"]
PACKAGE_ARTIFACTS = Path(__file__).resolve().parents[1] / "engine" / "compiled"  # engine.compile.shipped_artifacts_dir
RUNS = [("per-process", "cold"), ("per-process", "warm"), ("tables", "cold"), ("tables", "warm")]


def _dynamo_seconds() -> float:
    from torch._dynamo.utils import compilation_time_metrics

    # compile_inner: a frame traced and compiled the usual way; fullgraph_capture: traced by aot_compile (engine.frames)
    keys = ("_compile.compile_inner", "fullgraph_capture")
    return float(sum(sum(compilation_time_metrics.get(key, [])) for key in keys))


def child(args) -> dict:
    start = time.perf_counter()
    import torch
    from torch._dynamo.utils import counters

    from engine import FluxEngine, preset
    from engine.measure import environment_info
    from engine.models import synthetic_components
    from engine.resolution import parse_resolution
    from flux_kernels.tuning import tuning_stats

    imported = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    components = synthetic_components(args.variant, device=device, dtype=dtype, seed=0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    built = time.perf_counter()
    config = preset(args.preset)
    if args.no_frames:  # every frame traced in every process, as before engine.frames
        config = dataclasses.replace(config, cache=dataclasses.replace(config.cache, frames=False))
    pipe = FluxEngine.from_pipe(FluxEngine(**components), config)
    pipe.set_progress_bar_config(disable=True)
    optimised = time.perf_counter()
    graphs = getattr(getattr(pipe, "compile_state", None), "cuda_graphs", None)

    def call(height: int, width: int, profile: Path | None = None) -> dict:
        captures = graphs.captures if graphs else 0
        before = (tuning_stats(), int(counters["stats"]["unique_graphs"]), _dynamo_seconds(), captures,
                  int(counters["inductor"]["fxgraph_cache_miss"]))  # fmt: skip
        sync()
        profiler = cProfile.Profile() if profile is not None else None
        t0 = time.perf_counter()
        with profiler or contextlib.nullcontext():
            image = pipe(
                "a photograph of an astronaut riding a horse",
                height=height,
                width=width,
                output_type="pt",
                num_inference_steps=args.steps,
                generator=torch.Generator().manual_seed(0),
            ).images
            sync()
        seconds = time.perf_counter() - t0
        if profiler is not None:
            write_profile(profiler, profile)
        tuned = tuning_stats()
        return {
            "s": round(seconds, 3),
            "keys_tuned": tuned["tuned"] - before[0]["tuned"],
            "tuning_s": round(tuned["tuning_s"] - before[0]["tuning_s"], 3),
            "keys_from_tables": tuned["from_tables"] - before[0]["from_tables"],
            "graphs_compiled": int(counters["stats"]["unique_graphs"]) - before[1],
            "dynamo_compile_s": round(_dynamo_seconds() - before[2], 3),
            "cuda_graph_captures": (graphs.captures if graphs else 0) - before[3],
            # graphs inductor generated code for (not found in its cache, nor in loaded artefacts)
            "inductor_cache_misses": int(counters["inductor"]["fxgraph_cache_miss"]) - before[4],
            # the image's sum in float64: starts that ran the same compiled code make the same bits
            "checksum": image.double().sum().item(),
        }

    sizes = []
    for index, text in enumerate(args.sizes):
        height, width = parse_resolution(text)
        # each size's first call (its own file after the first: the start's, then a new size's)
        profile = args.profile
        if profile is not None and index > 0:
            profile = profile.with_name(f"{profile.stem}-{width}x{height}{profile.suffix}")
        first, warm = call(height, width, profile), call(height, width)
        sizes.append({"size": f"{width}x{height}", "first": first, "warm": warm,
                      "extra_s": round(first["s"] - warm["s"], 3)})  # fmt: skip
    state = getattr(pipe, "compile_state", None)
    artifacts = None  # which compile artefacts the engine loaded: this machine's own, shipped ones, or none
    if state is not None and (state.loaded_artifacts or state.loaded_shipped):
        artifacts = "machine" if state.loaded_artifacts else "shipped"
    shipped_kernels = state.shipped_kernels if state is not None else 0
    frames = state.frames.stats() if state is not None and state.frames is not None else None
    return {
        "frames": frames, "frames_saved": bool(state is not None and state.saved_frames),
        "preset": args.preset, "mode": os.environ.get("FLUX_KERNELS_TUNING", "tables"), "steps": args.steps,
        "artifacts_loaded": artifacts, "shipped_kernels": shipped_kernels,
        "dtype": str(pipe.transformer.dtype).removeprefix("torch."),  # as the compile key saw it
        "profiled": args.profile is not None,  # the first call ran under cProfile: inflated, not a start-up figure
        "import_s": round(imported - start, 2), "build_s": round(built - imported, 2),
        "optimize_s": round(optimised - built, 2), "sizes": sizes, "variant": args.variant,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "env": environment_info(device),  # card, driver, versions, commit, date: as every result file carries
    }  # fmt: skip


def write_profile(profiler: cProfile.Profile, path: Path, top: int = 60) -> None:
    """The profiled call's functions by cumulative and by own time, as pstats prints them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as file:
        for order in ("cumulative", "tottime"):
            pstats.Stats(profiler, stream=file).sort_stats(order).print_stats(top)


def write_manifest(out: Path, artifacts: Path, run: dict, env: dict) -> None:
    """Add each artefact's entry to out/MANIFEST.json, as engine/compiled/MANIFEST.json keeps them: what it was made
    for (engine.compile.manifest_key recomputes its name from this), and by what."""
    path = out / "MANIFEST.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    for artifact in sorted(artifacts.glob("*.bin")):
        manifest[artifact.name] = {
            "versions": {name: env.get(name) for name in ("torch", "triton", "diffusers")},
            "device": env.get("gpu") or "cpu",
            "dtype": run["dtype"],
            "model": run["variant"],
            "preset": run["preset"],
            "made_by": "python -m benchmarks.startup --artifacts-out (its cold run; bash benchmarks/gpu_plan.sh "
            "startup-shipped on a GPU)",
            "commit": env.get("commit"),
        }
        for field, suffix in (("triton_kernels", ".triton.zip"), ("frames", ".frames")):
            if artifact.with_suffix(suffix).is_file():
                manifest[artifact.name][field] = artifact.with_suffix(suffix).name
    path.write_text(json.dumps(manifest, indent=1) + "\n")


def run_child(preset: str, mode: str, folder: Path, args, shipped: Path | None = None, start: str = "") -> dict:
    env = {**os.environ, "FLUX_ENGINE_CACHE_DIR": str(folder), "TRITON_CACHE_DIR": str(folder / "triton"),
           "TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"), "FLUX_KERNELS_TUNING": mode}  # fmt: skip
    env.pop("FLUX_KERNELS_TUNING_DIR", None)
    # cold and warm starts find no shipped artefacts (not even the package's own, engine/compiled/): an empty place
    env["FLUX_ENGINE_SHIPPED_ARTIFACTS"] = str(shipped if shipped is not None else folder / "none-shipped")
    command = [sys.executable, "-m", "benchmarks.startup", "--child", "--preset", preset, "--steps", str(args.steps),
               "--variant", args.variant, "--sizes", *args.sizes]  # fmt: skip
    if args.no_frames:
        command.append("--no-frames")
    if args.profile_dir is not None:
        command += ["--profile", str(args.profile_dir / f"first-call-{preset}-{mode}-{start}.txt")]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return {"preset": preset, "mode": mode, "error": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _frames_origin(frames: dict | None) -> str:
    """'file 4', 'made 2 / usual 2': where a start's frames came from (engine.frames), '-' with frames off."""
    if not frames:
        return "-"
    origins = [stats["from"] for stats in frames.values()]
    return " / ".join(f"{origin} {origins.count(origin)}" for origin in sorted(set(origins)))


def table(results: list[dict]) -> str:
    lines = ["| preset | tuning | start | size | first call s | warm s | extra s | keys tuned (s) | from tables | "
             "graphs | dynamo s | captures | frames |", "|---" * 13 + "|"]  # fmt: skip
    for result in results:
        if "error" in result:
            lines.append(f"| {result['preset']} | {result['mode']} | {result['start']} | failed | | | | | | | | | |")
            continue
        for row in result["sizes"]:
            first = row["first"]
            lines.append(
                f"| {result['preset']} | {result['mode']} | {result['start']} | {row['size']} | {first['s']:.2f} | "
                f"{row['warm']['s']:.2f} | {row['extra_s']:.2f} | {first['keys_tuned']} ({first['tuning_s']:.2f}) | "
                f"{first['keys_from_tables']} | {first['graphs_compiled']} | {first['dynamo_compile_s']:.1f} | "
                f"{first['cuda_graph_captures']} | {_frames_origin(result.get('frames'))} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fp8-compile-fastacc-cudagraphs", help="one or more, comma-separated")
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="the first is the cold/warm start's")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--variant", default="flux-dev", help="synthetic model (tiny: a CPU check of this script)")
    parser.add_argument("--runs", default=",".join(f"{mode}:{start}" for mode, start in RUNS),
                        help="MODE:START pairs, comma-separated; a warm run reuses its mode's cold folder")  # fmt: skip
    parser.add_argument("--out", type=Path)
    parser.add_argument("--artifacts-out", type=Path, help="copy each cold run's compile artefacts here (to ship)")
    parser.add_argument("--profile-dir", type=Path, help="write each start's first call under cProfile here (text)")
    parser.add_argument("--no-frames", action="store_true", help="trace every frame in each process (no engine.frames)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", type=Path, help=argparse.SUPPRESS)  # the child's: its profile's file
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    results, env = [], None  # env: the first child's (card, versions, commit, date)
    with tempfile.TemporaryDirectory(prefix="flux-startup-") as scratch:
        for preset in args.preset.split(","):
            for pair in args.runs.split(","):
                mode, start = pair.split(":")
                folder = Path(scratch) / preset / mode  # the cold run's, reused warm
                shipped = None
                if start == "shipped":  # a fresh folder; the cold run's artefacts as the shipped ones
                    folder, shipped = Path(scratch) / preset / f"{mode}-shipped", folder / "artifacts"
                elif start == "package":  # a fresh folder; the package's own shipped artefacts
                    folder, shipped = Path(scratch) / preset / f"{mode}-package", PACKAGE_ARTIFACTS
                run = run_child(preset, mode, folder, args, shipped, start)
                if start == "cold":  # our Triton kernels as the package would ship them, beside the artefacts
                    from engine.triton_bundle import pack_triton_kernels

                    for artifact in (folder / "artifacts").glob("*.bin"):
                        pack_triton_kernels(folder / "triton", artifact.with_suffix(".triton.zip"))
                run_env = run.pop("env", None)
                env = env or run_env
                if start == "cold" and args.artifacts_out and run_env is not None:
                    args.artifacts_out.mkdir(parents=True, exist_ok=True)
                    for artifact in (folder / "artifacts").glob("*.*"):
                        shutil.copy2(artifact, args.artifacts_out / artifact.name)
                    write_manifest(args.artifacts_out, folder / "artifacts", run, run_env)
                results.append({**run, "start": start})
                print(table(results[-1:]), flush=True)
                if args.out:  # after each run: a stage cut short by its time limit keeps what it measured
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps({"env": env or {"gpu": None}, "runs": results}, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
