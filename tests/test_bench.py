import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from engine import bench
from engine.models import VARIANTS

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
    cmd += ["--warmup", "1", "--out", str(out), "--save-baseline", str(saved), "--gate", str(gate)]
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
    assert json.loads(saved.read_text())["rows"] == json.loads(out.read_text())["rows"]


def test_bench_gate_reports_the_regression(bench_run):
    proc, _, _ = bench_run
    assert "GATE FAILED: 1 regression(s)" in proc.stdout
    assert "not in the baseline (not gated): diffusers" in proc.stdout


def test_bench_gate_with_a_broken_baseline_exits_4(tmp_path, capsys):
    broken = tmp_path / "b.json"
    broken.write_text(json.dumps({"env": {"gpu": None}, "rows": [{"config": "x"}]}))
    assert bench.main(["--gate", str(broken), "--device", "cpu"]) == 4
    assert "lacks" in capsys.readouterr().err


def test_kernel_presets_are_refused_where_triton_cannot_run(monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("Triton runs here")
    # outside the tests the CPU has no Triton interpreter switched on (conftest turns it on for the kernel
    # tests); Triton reads the switch from the environment at each use
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert bench.main(["--preset", "baseline,kernels", "--device", "cpu"]) == 2
    assert "kernels run our Triton kernels, which need a CUDA GPU" in capsys.readouterr().err


def test_presets_parse_as_a_list_or_the_ladder():
    from engine.config import PRESETS

    assert bench.parse_presets("baseline, compile") == ["baseline", "compile"]
    assert bench.parse_presets("ladder") == list(PRESETS)
    with pytest.raises(bench.EngineError, match="twice"):
        bench.parse_presets("compile,compile")


def test_flop_counter_matches_the_published_step_cost():
    # ARCHITECTURE.md: 74.4 TFLOP per flux-dev step at 1024^2 with 512 text tokens
    flops = bench.transformer_step_flops(VARIANTS["flux-dev"].transformer, 1024, 1024, 512)
    assert flops / 1e12 == pytest.approx(74.4, abs=0.05)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--res", "1000"], "height 1000 is not a multiple of 16; use 992 or 1008"),
        (["--res", "1024x770"], "height 770 is not a multiple of 16; use 768 or 784"),
        (["--model", "synthetic:flux-dev", "--res", "4096"], r"outside 256..2048.*--allow-any-size"),
        (["--model", "synthetic:flux-dev", "--res", "1024", "--device", "cpu"], "needs a CUDA GPU"),
        (["--steps", "0"], "steps 0 must be at least 1"),
        (["--model", "synthetic:flux-pro"], "unknown model variant 'synthetic:flux-pro'"),
        (["--preset", "fastest"], "unknown preset 'fastest'"),
        (["--runs", "0"], "--runs 0 must be at least 1"),
        (["--model", "/no/such/model"], "does not exist"),
        (["--res", "big"], "WIDTHxHEIGHT"),
        (["--max-slowdown", "fast"], "is not a number"),
    ],
)
def test_bench_rejects_bad_input_with_a_clear_message(argv, message, capsys):
    code = bench.main([*argv, "--device", "cpu"] if "--device" not in argv else argv)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert __import__("re").search(message, err), err


def test_bench_rejects_a_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "flux.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    (folder / "transformer").mkdir()
    (folder / "transformer" / "config.json").write_text(json.dumps(VARIANTS["tiny"].transformer))
    code = bench.main(["--model", str(bad), "--config-folder", str(folder), "--res", "256", "--device", "cpu"])
    assert code == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


def test_json_is_written_atomically(tmp_path):
    path = tmp_path / "r.json"
    bench.write_json(path, {"x": math.inf, "y": math.nan, "z": [1.5]})
    assert json.loads(path.read_text()) == {"x": "inf", "y": None, "z": [1.5]}
    with pytest.raises(TypeError):
        bench.write_json(path, {"bad": object()})
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
    report = bench.quantization_summary(engine, "fp8-test")
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
