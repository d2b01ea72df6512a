"""benchmarks/startup.py on the tiny model (CPU): each run is a fresh process whose first call compiles, its warm
call compiles nothing, and a new size compiles nothing either (dynamic shapes); the JSON holds every call. A fresh
folder with the cold run's compile artefacts found as shipped ones (engine/compile.py) generates no code."""

import json

import pytest

from benchmarks import startup
from engine.compile import manifest_key


@pytest.mark.slow
def test_startup_runs_fresh_processes_and_reports_each_call(tmp_path):
    out = tmp_path / "startup.json"
    argv = ["--variant", "tiny", "--preset", "compile", "--sizes", "64", "64x96", "--steps", "1"]
    runs = ["--runs", "tables:cold,tables:warm,tables:shipped,tables:package"]
    runs += ["--artifacts-out", str(tmp_path / "ship")]
    runs += ["--profile-dir", str(tmp_path / "profiles")]
    assert startup.main([*argv, *runs, "--out", str(out)]) == 0
    (artifact,) = (tmp_path / "ship").glob("*.bin")  # the cold run's artefacts, kept to ship
    # with the manifest entry that names what they are for: the engine's key recomputed from it is their name
    manifest = json.loads((tmp_path / "ship" / "MANIFEST.json").read_text())
    assert list(manifest) == [artifact.name] and manifest[artifact.name]["model"] == "tiny"
    assert manifest_key(manifest[artifact.name]) == artifact.stem
    assert manifest[artifact.name]["frames"] == artifact.with_suffix(".frames").name  # engine.frames, shipped too
    data = json.loads(out.read_text())
    assert data["env"]["gpu"] is None and data["env"]["commit"]  # a CPU run: no card, and the environment's facts
    cold, warm, shipped, package = data["runs"]
    assert "error" not in cold, cold.get("error")
    assert [row["size"] for row in cold["sizes"]] == ["64x64", "64x96"]
    first, new_size = cold["sizes"]
    assert first["first"]["graphs_compiled"] > 0 and first["warm"]["graphs_compiled"] == 0
    assert new_size["first"]["graphs_compiled"] == 0
    # the warm run starts from the cold run's cache folder: dynamo traces again, inductor loads what it compiled
    assert warm["start"] == "warm" and warm["sizes"][0]["first"]["graphs_compiled"] > 0
    assert cold["artifacts_loaded"] is None and warm["artifacts_loaded"] == "machine"
    assert cold["sizes"][0]["first"]["inductor_cache_misses"] > 0
    # an empty cache folder: only the shipped artefacts can have served inductor's graphs
    assert shipped["start"] == "shipped" and shipped["artifacts_loaded"] == "shipped", shipped.get("error")
    assert shipped["sizes"][0]["first"]["inductor_cache_misses"] == 0
    # the package ships artefacts for GPUs only (engine/compiled/MANIFEST.json): none serves this CPU key
    assert package["start"] == "package" and package["artifacts_loaded"] is None, package.get("error")
    assert package["sizes"][0]["first"]["inductor_cache_misses"] > 0
    # the regions' frames (engine.frames): made by the cold run, loaded by the warm and the shipped one; diffusers'
    # attention dispatch (this preset's) guards an enum's identity, so the blocks' frames are traced as before
    # (remembered in the frames file: the warm and shipped starts do not try again)
    for run, origin, tries in ((cold, "made", 1), (warm, "file", 0), (shipped, "file", 0), (package, "made", 1)):
        frames = {name.split(":")[-1]: stats for name, stats in run["frames"].items()}
        assert frames["AdaLayerNormContinuous"]["from"] == origin, frames
        block = frames["FluxTransformerBlock"]
        assert block["from"] == "usual" and block["tries"] == tries and "identity" in block["refused"], block
    assert warm["sizes"][0]["first"]["checksum"] == cold["sizes"][0]["first"]["checksum"]  # the same code, bits
    # each start's first call profiled: the pipeline's own call is among the functions listed
    for start in ("cold", "warm", "shipped"):
        text = (tmp_path / "profiles" / f"first-call-compile-tables-{start}.txt").read_text()
        assert "function calls" in text and "__call__" in text
    assert all(run["profiled"] for run in data["runs"])  # marked: a profiled first call is no start-up figure
