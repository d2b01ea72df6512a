import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from engine.bench import arguments, cli, phases, plan, report
from engine.bench import run as measurement
from engine.errors import EngineError
from engine.files import check_writable
from engine.models import PIPELINE_COMPONENTS, VARIANTS

REPO = Path(__file__).resolve().parent.parent

ROW_FIELDS = {
    "config",
    "height",
    "width",
    "steps",
    "batch",
    "runs",
    "ms_per_step",
    "ms_per_step_p20",
    "ms_per_step_p80",
    "tflop_per_step",
    "tflops",
    "encode_s",
    "denoise_s",
    "decode_s",
    "total_s",
    "peak_allocated_gib",
    "peak_reserved_gib",
    "nvml_used_gib",
    "speedup",
    "psnr_db",
    "latent_rel_err",
}
ENV_FIELDS = {"gpu", "driver", "torch", "triton", "diffusers", "transformers", "cuda", "commit", "date"}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    out, saved, gate = folder / "result.json", folder / "saved.json", folder / "gate.json"
    # A gate baseline no real run can match: every step 1 ns. The run must fail the gate (exit 1) and still
    # write its results.
    row = {"config": "baseline", "height": 64, "width": 64, "steps": 2, "batch": 1}
    gate.write_text(
        json.dumps({"env": {"gpu": None}, "rows": [{**row, "ms_per_step": 1e-6, "peak_allocated_gib": None}]})
    )
    cmd = [sys.executable, "-m", "engine.bench", "--res", "64", "96x64", "--steps", "2", "--runs", "2"]
    cmd += ["--preset", "baseline", "--warmup", "1", "--out", str(out), "--save-baseline", str(saved)]
    cmd += ["--gate", str(gate)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    return proc, out, saved


def test_bench_runs_end_to_end_and_writes_every_field(bench_run):
    proc, out, _ = bench_run
    assert proc.returncode == 1, proc.stderr[-3000:]  # the gate's verdict, see the fixture
    assert "tiny synthetic model on the CPU" in proc.stdout
    result = json.loads(out.read_text())
    assert result["env"].keys() >= ENV_FIELDS
    assert result["model"] == "synthetic:tiny"
    assert [(r["config"], r["width"], r["height"]) for r in result["rows"]] == [
        ("diffusers", 64, 64),
        ("baseline", 64, 64),
        ("diffusers", 96, 64),
        ("baseline", 96, 64),
    ]
    for row in result["rows"]:
        assert row.keys() >= ROW_FIELDS
        assert row["ms_per_step"] > 0 and row["tflop_per_step"] > 0
        assert row["encode_s"] > 0 and row["denoise_s"] > 0 and row["decode_s"] > 0
        assert row["total_s"] >= row["denoise_s"]
    engine_rows = [r for r in result["rows"] if r["config"] == "baseline"]
    for row in engine_rows:
        # the baseline preset changes nothing: identical images and latents
        assert row["psnr_db"] == "inf" and row["latent_rel_err"] == 0.0
        assert row["speedup"] > 0


def test_bench_prints_the_table_and_writes_csv_and_plot(bench_run):
    proc, out, saved = bench_run
    assert "ms/step" in proc.stdout and "PSNR dB" in proc.stdout
    assert f"wrote {out} (+ .csv, .png)" in proc.stdout
    header = out.with_suffix(".csv").read_text().splitlines()[0].split(",")
    assert {"config", "ms_per_step", "psnr_db", "peak_allocated_gib"} <= set(header)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the run failed its gate (see the fixture): it is no baseline, and --save-baseline says so
    assert not saved.exists() and f"not saving the gate baseline {saved}: a gate found a regression" in proc.stderr


def test_bench_gate_reports_the_regression(bench_run):
    proc, _, _ = bench_run
    assert "GATE FAILED: 1 regression(s)" in proc.stdout
    assert "not in the baseline (not gated): diffusers" in proc.stdout


def test_bench_gate_with_a_broken_baseline_exits_4(tmp_path, capsys):
    broken = tmp_path / "b.json"
    broken.write_text(json.dumps({"env": {"gpu": None}, "rows": [{"config": "x"}]}))
    assert cli.main(["--gate", str(broken), "--device", "cpu"]) == 4
    assert "lacks" in capsys.readouterr().err


def test_kernel_presets_are_refused_where_triton_cannot_run(monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("Triton runs here")
    # outside the tests the CPU has no Triton interpreter switched on (conftest turns it on for the kernel
    # tests); Triton reads the switch from the environment at each use
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert cli.main(["--preset", "baseline,kernels", "--device", "cpu"]) == 2
    assert "kernels run our Triton kernels, which need a CUDA GPU" in capsys.readouterr().err


def test_presets_parse_as_a_list_or_the_ladder():
    from engine.config import PRESETS

    assert arguments.parse_presets("baseline, compile") == ["baseline", "compile"]
    assert arguments.parse_presets("ladder") == list(PRESETS)
    with pytest.raises(EngineError, match="twice"):
        arguments.parse_presets("compile,compile")


def test_flop_counter_matches_the_published_step_cost():
    # ARCHITECTURE.md: 74.4 TFLOP per flux-dev step at 1024^2 with 512 text tokens
    flops = phases.transformer_step_flops(VARIANTS["flux-dev"].transformer, 1024, 1024, 512)
    assert flops / 1e12 == pytest.approx(74.4, abs=0.05)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--res", "1000"], "height 1000 is not a multiple of 16; use 992 or 1008"),
        (["--res", "1024x770"], "height 770 is not a multiple of 16; use 768 or 784"),
        (["--model", "synthetic:flux-dev", "--res", "4096"], r"outside 256..2048.*--allow-any-size"),
        (["--model", "synthetic:flux-dev", "--res", "1024", "--device", "cpu"], "needs a CUDA GPU"),
        (["--steps", "0"], "steps 0 is outside 1..1000"),
        (["--model", "synthetic:flux-pro"], "unknown model variant 'synthetic:flux-pro'"),
        (["--preset", "fastest"], "unknown preset 'fastest'"),
        (["--runs", "0"], "--runs 0 must be at least 1"),
        (["--model", "/no/such/model"], "does not exist"),
        (["--res", "big"], "WIDTHxHEIGHT"),
        (["--max-slowdown", "fast"], "is not a number"),
        (["--lora", "synthetic:0"], "synthetic:RANK takes a rank >= 1"),
        (["--lora", "/no/such/lora.safetensors"], "is not a file.*nothing is downloaded"),
        (["--gpus", "2"], "needs 2 processes.*not started by torchrun"),
        (["--max-sequence-length", "0"], r"--max-sequence-length 0 is outside 1..512"),
        (["--max-sequence-length", "100000"], r"outside 1..512"),
        (["--res", "64", "64x64"], "names a size twice"),
        # the missing folder named, not a size range guessed for it
        (["--model", "/no/such/model", "--res", "64"], r"--model '/no/such/model' does not exist.*downloaded"),
    ],
)
def test_bench_rejects_bad_input_with_a_clear_message(argv, message, capsys):
    code = cli.main([*argv, "--device", "cpu"] if "--device" not in argv else argv)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert __import__("re").search(message, err), err


def test_bench_rejects_an_unreadable_lora_file(tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    code = cli.main(["--model", "synthetic:tiny", "--res", "64", "--steps", "1", "--runs", "1", "--device", "cpu",
                     "--lora", str(junk), "--out", str(tmp_path / "b.json")])  # fmt: skip
    assert code == 2
    assert "could not be read" in capsys.readouterr().err


def test_bench_rejects_a_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "flux.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    for component in PIPELINE_COMPONENTS:
        (folder / component).mkdir()
    for tokenizer in ("tokenizer", "tokenizer_2"):  # the folder checks pass: the file is what is wrong
        (folder / tokenizer / "tokenizer.json").write_text("{}")
    (folder / "transformer" / "config.json").write_text(json.dumps(VARIANTS["tiny"].transformer))
    code = cli.main(["--model", str(bad), "--config-folder", str(folder), "--res", "256", "--device", "cpu"])
    assert code == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


def test_json_is_written_atomically(tmp_path):
    path = tmp_path / "r.json"
    report.write_json(path, {"x": math.inf, "y": math.nan, "z": [1.5]})
    assert json.loads(path.read_text()) == {"x": "inf", "y": None, "z": [1.5]}
    with pytest.raises(TypeError):
        report.write_json(path, {"bad": object()})
    # the failed write left the previous file whole and no temporary behind
    assert json.loads(path.read_text())["z"] == [1.5]
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_quantised_configs_report_per_layer_sqnr(tiny_components, capsys):
    from diffusers import FluxPipeline

    from engine import EngineConfig, FluxEngine
    from engine.config import QuantConfig
    from engine.models import synthetic_components

    components = synthetic_components("tiny", device="cpu", dtype=tiny_components["vae"].dtype, seed=0)
    engine = FluxEngine.from_pipe(FluxPipeline(**components), EngineConfig(quant=QuantConfig(transformer="fp8")))
    report = measurement.quantization_summary(engine, "fp8-test")
    assert report["transformer"]["mode"] == "fp8"
    assert report["transformer"]["quantized_layers"] > 0
    assert report["transformer"]["sqnr"]["min_db"] >= 25.0
    assert "fp8-test: transformer fp8" in capsys.readouterr().out


def test_commit_override_wins_over_git(monkeypatch):
    from engine.measure import git_commit

    monkeypatch.setenv("FLUX_ENGINE_COMMIT", "abc1234")
    assert git_commit() == "abc1234"
    monkeypatch.delenv("FLUX_ENGINE_COMMIT")
    assert git_commit() != "abc1234"


# ----------------------------------------------------------------------------- the main command's default run


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`python -m engine.bench` with no --preset, as the README's main command runs it (small and short here)."""
    out = tmp_path_factory.mktemp("default") / "result.json"
    cmd = [sys.executable, "-m", "engine.bench", "--res", "64", "--steps", "2", "--out", str(out)]
    umask_022 = lambda: os.umask(0o022)  # noqa: E731 - the usual umask, whatever the test runner's is
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, preexec_fn=umask_022)
    return proc, out


def test_default_run_compares_diffusers_with_the_fastest_preset_here(default_run):
    proc, out = default_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    # first line: what is compared with what, and why that config
    assert lines[0].startswith("flux-engine tiled-vae vs diffusers FluxPipeline, synthetic:tiny at 64x64, 2 steps")
    assert "fastest preset on a CPU" in lines[0]
    # last line: the verdict, from the same rows as the JSON
    result = json.loads(out.read_text())
    assert [r["config"] for r in result["rows"]] == ["diffusers", "tiled-vae"]
    engine_row = result["rows"][1]
    assert engine_row["runs"] == 1  # the CPU default
    assert lines[-1].startswith("flux-engine tiled-vae vs diffusers, 64x64, 2 steps x 1 run: ")
    assert f"{engine_row['speedup']:.2f}x per step" in lines[-1]
    assert f"{engine_row['total_s']:.2f} vs {result['rows'][0]['total_s']:.2f} s per image" in lines[-1]
    assert result["headline"] == lines[0]


def test_result_files_are_readable_by_all(default_run):
    _, out = default_run
    for path in (out, out.with_suffix(".csv"), out.with_suffix(".png")):
        assert path.stat().st_mode & 0o777 == 0o644, path  # mkstemp's 0600 would hide the JSON from others
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.csv", "result.json", "result.png"]


def test_cpu_results_go_where_git_ignores_them():
    cpu_path = report.default_out_path({"gpu": None, "date": "2026-11-29T16:00:00+00:00"})
    assert cpu_path.parent == Path(report.CPU_RESULTS)
    ignored = subprocess.run(["git", "check-ignore", "-q", str(cpu_path)], cwd=REPO)
    assert ignored.returncode == 0, f"{cpu_path} is not ignored by git: a CPU run would dirty the clone"
    gpu_path = report.default_out_path({"gpu": "NVIDIA H200", "date": "2026-11-29T16:00:00+00:00"})
    assert gpu_path == Path("benchmarks/results/bench-h200-20261129T160000.json")


def test_an_unwritable_out_fails_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cmd = [sys.executable, "-m", "engine.bench", "--out", str(blocker / "x.json")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: --out '{blocker / 'x.json'}': ")
    assert "is a file, not a folder" in proc.stderr
    assert "bench:" not in proc.stderr  # refused before the progress bar started
    assert not list(tmp_path.glob("benchmarks"))


def test_results_that_cannot_be_written_at_the_end_go_to_a_fallback(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    result = json.loads((REPO / "benchmarks/results/bench-fp8-ab-h100-80gb-hbm3-20261126-2228.json").read_text())
    blocked = tmp_path / "gone"
    blocked.write_text("")  # the folder the results were meant for became a file after the start-up check
    written = report.save_results(result, blocked / "bench.json")
    assert written == tmp_path / "tmp" / "bench.json"
    assert json.loads(written.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert written.with_suffix(".png").is_file() and written.with_suffix(".csv").is_file()
    assert f"writing it to {written} instead" in capsys.readouterr().err


def test_results_already_in_the_temporary_folder_fall_back_to_home(tmp_path, capsys, monkeypatch):
    temporary, home = tmp_path / "tmp", tmp_path / "home"
    home.mkdir()
    temporary.write_text("")  # the temporary folder, where --out pointed, cannot take files any more
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    monkeypatch.setenv("HOME", str(home))
    result = {"env": {"gpu": None, "commit": "x", "date": "2026-11-29"}, "model": "m", "dtype": "fp32", "rows": []}
    written = report.save_results(result, temporary / "bench.json")
    assert written == home / "bench.json" and json.loads(written.read_text())["rows"] == []


def test_a_folder_is_not_a_result_path(tmp_path):
    with pytest.raises(EngineError, match=r"is a folder; name a file in it, e\.g\. --out .*result\.json"):
        check_writable(tmp_path, "--out")
    assert cli.main(["--out", str(tmp_path), "--device", "cpu"]) == 2


def test_a_card_too_small_for_the_baseline_is_told_before_any_work():
    flux_dev = plan.Plan(None, "synthetic:flux-dev", [(1024, 1024)], VARIANTS["flux-dev"], None)
    args = cli.build_parser().parse_args([])
    with pytest.raises(EngineError, match=r"the diffusers baseline needs ~37 GiB at 1024x1024 .* this GPU's 24 GiB"):
        plan.check_baseline_fits(flux_dev, args, 24.0)
    plan.check_baseline_fits(flux_dev, args, 80.0)  # fits: no error


def test_warm_call_seconds_counts_the_warm_up_calls_own_steps():
    row = measurement.Row("x", 64, 64, 4, 1, 1, 100.0, 90.0, 110.0, 1.0, 1.0, 0.01, 0.4, 0.2, 0.62, None, None, None)
    assert measurement.warm_call_seconds(row, 4) == row.total_s  # as many steps as the timed calls: their time
    assert measurement.warm_call_seconds(row, 1) == pytest.approx(0.01 + 0.2 + 0.1)  # encode + decode + 1 step


def _rows(sizes, configs, memory):
    rows = []
    for height, width in sizes:
        for index, config in enumerate(configs):
            ms = 100.0 * (index + 1) * height * width / 1024**2
            rows.append({
                "config": config, "height": height, "width": width, "steps": 4, "ms_per_step": ms,
                "ms_per_step_p20": ms * 0.98, "ms_per_step_p80": ms * 1.03, "speedup": 1.0 / (index + 1),
                "encode_s": 0.01, "denoise_s": 4 * ms / 1e3, "decode_s": 0.2, "total_s": 4 * ms / 1e3 + 0.21,
                "peak_allocated_gib": 30.0 - index if memory else None,
            })  # fmt: skip
    return rows


@pytest.mark.parametrize(
    ("sizes", "memory", "panels"),
    [([(2048, 2048)], True, 3), ([(2048, 2048)], False, 2), ([(1024, 1024), (2048, 2048)], True, 2),
     ([(1024, 1024), (2048, 2048)], False, 1)],
)  # fmt: skip
def test_plot_draws_bars_for_one_size_and_lines_for_several_with_axes_from_zero(sizes, memory, panels):
    result = {
        "model": "synthetic:flux-dev", "dtype": "bf16", "rows": _rows(sizes, ["diffusers", "fp8"], memory),
        "env": {"gpu": "NVIDIA H200" if memory else None, "commit": "abc", "date": "2026-11-29T16:00"},
    }  # fmt: skip
    figure = report.make_figure(result)
    axes = figure.axes
    assert len(axes) == panels  # no empty memory panel on a CPU
    for axis in axes:
        assert axis.get_ylim()[0] == 0  # a y axis from zero: noise does not look like a difference
    if len(sizes) == 1:
        assert len(axes[0].patches) == 2  # one bar per config, with its p20-p80 error bar
        assert axes[0].get_ylim()[1] >= max(r["ms_per_step_p80"] for r in result["rows"])
    else:
        assert len(axes[0].lines) == 2 and axes[0].collections  # a line per config and its p20-p80 band


def test_help_and_argument_errors_come_before_torch_is_imported():
    # torch alone takes 1-4 s to import (longer with CUDA); --help and a typo must not wait for it
    code = (
        "import sys\n"
        "from engine.bench.cli import build_parser, check_arguments\n"
        "from engine.generate import build_parser as generate_parser\n"
        "build_parser().format_help(); generate_parser().format_help()\n"
        "try:\n"
        "    check_arguments(build_parser().parse_args(['--res', '1000']))\n"
        "except Exception as err:\n"
        "    print(type(err).__name__)\n"
        "print(sorted(name for name in ('torch', 'diffusers', 'transformers') if name in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines() == ["ResolutionError", "[]"], proc.stderr


def test_bench_with_a_synthetic_lora_on_both_sides(tmp_path, capsys):
    """--lora synthetic:RANK: the same adapter on diffusers and on the engine (so the PSNR compares like with like),
    the engine config measured without it first, and its hot-swap: time, recompiles and captures (none to make on
    this uncompiled preset: tests/test_lora*.py count them under compile); the row says which adapter was active."""
    import json

    out = tmp_path / "lora.json"
    argv = ["--res", "64", "--steps", "1", "--preset", "tiled-vae", "--lora", "synthetic:4", "--device", "cpu"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    rows = {row["config"]: row for row in json.loads(out.read_text())["rows"]}
    engine = rows["tiled-vae"]
    assert engine["lora"] == "synthetic:4" and engine["lora_swap_s"] > 0
    assert engine["lora_off_ms_per_step"] > 0 and engine["lora_swap_recompiles"] == 0
    assert engine["lora_swap_captures"] == 0
    # the engine's image with the adapter against diffusers' with the same adapter: the preset's own agreement
    # (tiled-vae does not tile a 64 px image: equal to the last bit, "inf" in the JSON)
    assert float(engine["psnr_db"]) > 60
    assert "LoRA synthetic:4 active on both" in capsys.readouterr().out


def test_lora_with_gpus_is_refused_rather_than_left_out(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc-per-node 2 sets it
    assert cli.main(["--gpus", "2", "--lora", "synthetic:4", "--device", "cpu"]) == 2
    assert "--lora is not run with --gpus yet" in capsys.readouterr().err


def test_a_fresh_compile_cache_looks_for_no_shipped_artefacts(monkeypatch, tmp_path):
    """The bench's cold compile is cold: artefacts shipped with the package (engine/compiled/) are not looked for
    then; a place the user names for them stays theirs."""
    from engine import preset
    from engine.compile import SHIPPED_ARTIFACTS_ENV, shipped_artifacts_dir

    monkeypatch.delenv(SHIPPED_ARTIFACTS_ENV, raising=False)
    assert shipped_artifacts_dir().name == "compiled"  # the package's own, before the bench
    config = measurement.with_compile_cache(preset("compile"), argparse.Namespace(cache_dir=None))
    place = shipped_artifacts_dir()
    assert Path(config.cache.directory) in place.parents and not place.exists()
    monkeypatch.setenv(SHIPPED_ARTIFACTS_ENV, str(tmp_path))
    measurement.with_compile_cache(preset("compile"), argparse.Namespace(cache_dir=None))
    assert shipped_artifacts_dir() == tmp_path


def test_each_config_loads_its_components_after_the_last_ones_are_gone(tmp_path, monkeypatch):
    """Before: the last config's components were still held while the next config's loaded, so its transformer (in
    reference cycles after a call, as diffusers' own) outlived the collection and, at times, counted in the next
    config's peaks (the cuDNN preset's 1024^2 peak 33.0 GiB in some runs, 21.9 in others: an fp8 transformer)."""
    import gc
    import weakref

    from engine.bench import cli as bench_cli
    from engine.bench import run as bench_run_module

    loaded, alive_at_load = [], []
    original = bench_run_module.load_components

    def load_components(*args, **kwargs):
        alive_at_load.append(sum(ref() is not None for ref in loaded))
        components = original(*args, **kwargs)
        loaded.append(weakref.ref(components["transformer"]))
        return components

    monkeypatch.setattr(bench_run_module, "load_components", load_components)
    argv = ["--model", "synthetic:tiny", "--device", "cpu", "--res", "64", "--allow-any-size", "--steps", "1",
            "--runs", "1", "--preset", "baseline,compile", "--out", str(tmp_path / "r.json")]  # fmt: skip
    gc.disable()  # the automatic collection runs at its own times: only the bench's own may free them
    try:
        assert bench_cli.main(argv) == 0
    finally:
        gc.enable()
    assert alive_at_load == [0, 0]
