import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_readme_table", REPO / "benchmarks" / "make_readme_table.py")
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)


def test_results_page_is_generated_from_the_recorded_results():
    assert table.main(["--check"]) == 0, "benchmarks/RESULTS.md is stale: run python benchmarks/make_readme_table.py"


def _row(config, ms, **extra):
    return {"config": config, "height": 1024, "width": 1024, "ms_per_step": ms, "tflops": 74.4 / ms * 1e3, **extra}


def test_table_keeps_the_newest_run_per_card_and_preset(tmp_path, monkeypatch):
    env = {"gpu": "NVIDIA H100 80GB HBM3", "commit": "abc", "date": "2026-01-01T00:00:00"}
    for name, date, ms in (("old", "2026-01-01T00:00:00", 150.0), ("new", "2026-02-01T00:00:00", 120.0)):
        payload = {
            "env": {**env, "date": date},
            "model": "synthetic:flux-dev",
            "preset": "kernels",
            "rows": [_row("diffusers", 180.0), _row("kernels", ms, speedup=180.0 / ms, psnr_db=48.0)],
        }
        (tmp_path / f"bench-{name}.json").write_text(json.dumps(payload))
    monkeypatch.setattr(table, "RESULTS", tmp_path)
    text = table.render()
    assert "| 120.0 | 180.0 | 1.50x |" in text
    assert "150.0" not in text
    assert "`bench-new.json`" in text


def test_cpu_runs_do_not_enter_the_table(tmp_path, monkeypatch):
    payload = {"env": {"gpu": None, "date": "2026-03-01T00:00:00"}, "model": "synthetic:tiny", "preset": "baseline"}
    payload["rows"] = [_row("diffusers", 7000.0), _row("baseline", 7100.0)]
    (tmp_path / "bench-cpu.json").write_text(json.dumps(payload))
    monkeypatch.setattr(table, "RESULTS", tmp_path)
    assert table.render() == "No GPU results are recorded yet."


def test_main_writes_the_results_page_and_check_detects_drift(tmp_path, monkeypatch):
    results, page = tmp_path / "results", tmp_path / "RESULTS.md"
    results.mkdir()
    env = {"gpu": "NVIDIA H100 80GB HBM3", "commit": "abc", "date": "2026-02-01T00:00:00"}
    payload = {"env": env, "model": "synthetic:flux-dev", "preset": "kernels"}
    payload["rows"] = [_row("diffusers", 180.0), _row("kernels", 120.0, speedup=1.5, psnr_db=48.0)]
    (results / "bench-h100.json").write_text(json.dumps(payload))
    monkeypatch.setattr(table, "RESULTS", results)
    monkeypatch.setattr(table, "PAGE", page)
    assert table.main(["--check"]) == 1  # missing page
    assert table.main([]) == 0
    text = page.read_text()
    assert text.startswith("# flux-engine results\n")
    assert "| card | date | commit | model | size | preset | ms/step |" in text
    assert "](../README.md)" in text
    assert table.main(["--check"]) == 0
    page.write_text(text.replace("120.0", "119.0"))
    assert table.main(["--check"]) == 1
