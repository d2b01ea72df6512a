"""Regional compile of the tiny model: fullgraph, the designed graph count, no recompile across
resolutions, numerics vs eager, and the persistent cache across processes (by counters, not time)."""

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_call_kwargs
from diffusers import FluxPipeline
from torch._dynamo.utils import counters

from engine import EngineConfig, FluxEngine
from engine.config import AttentionConfig, CacheConfig, CompileConfig
from engine.errors import ConfigError
from engine.models import synthetic_components

REPO = Path(__file__).resolve().parent.parent

# The resolution sequence of the issue (1024, 1360x768, 512, 832x1216, 2048) divided by 16 and
# rounded to multiples of 16, as (height, width).
TINY_SEQUENCE = [(64, 64), (48, 80), (32, 32), (80, 48), (128, 128)]

# Graphs per compile: the double-stream block, the single-stream block, time_text_embed and
# norm_out. Four, whatever the resolution. Two first-block variants are designed away
# (engine/compile.py): the double block's by making the embedders' outputs fresh tensors
# (`_fresh_block_inputs`), the single block's by laying its inputs out as the later ones'
# (`_joint_views`: dynamo guards on strides and view bases).
DESIGNED_GRAPHS = 4


def _engine(config: EngineConfig, dtype=torch.float32, device="cpu") -> FluxEngine:
    pipe = FluxPipeline(**synthetic_components("tiny", device=device, dtype=dtype, seed=0))
    return FluxEngine.from_pipe(pipe, config)


def _run_sequence(engine, baseline, check_exact: bool):
    torch._dynamo.reset()
    counters.clear()
    for index, (height, width) in enumerate(TINY_SEQUENCE):
        kwargs = tiny_call_kwargs(height=height, width=width)
        if index == 0:
            images = engine(**kwargs).images
            assert counters["stats"]["unique_graphs"] == DESIGNED_GRAPHS
        else:
            with torch._dynamo.config.patch(error_on_recompile=True):
                images = engine(**kwargs).images
        expected = baseline(**tiny_call_kwargs(height=height, width=width)).images
        assert images.shape == (1, 3, height, width)
        if check_exact:
            torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == DESIGNED_GRAPHS
    assert not counters["graph_break"]


def test_regional_compile_has_no_graph_break_and_no_recompile_across_sizes(tiny_components):
    config = EngineConfig(compile=CompileConfig(mode="regional", backend="aot_eager"))
    engine = _engine(config)
    assert engine.compile_state.compiled_modules == [
        "transformer_blocks x2",
        "single_transformer_blocks x2",
        "time_text_embed",
        "norm_out",
    ]
    # aot_eager runs the captured aten graph: equal to eager up to fp32 rounding
    _run_sequence(engine, FluxPipeline(**tiny_components), check_exact=True)


def test_kernels_inside_compiled_regions_hold_fullgraph(device):
    config = EngineConfig(
        attention=AttentionConfig(backend="triton", fused_norms=True),
        compile=CompileConfig(mode="regional", backend="aot_eager"),
    )
    engine = _engine(config, dtype=torch.bfloat16, device=device)
    baseline = FluxPipeline(**synthetic_components("tiny", device=device, dtype=torch.bfloat16, seed=0))
    _run_sequence(engine, baseline, check_exact=False)


def test_compile_config_validation():
    with pytest.raises(ConfigError, match="compile.mode='whole' is not one of 'none', 'regional'"):
        CompileConfig(mode="whole")
    assert CompileConfig(mode="regional").label == "compile=regional"
    assert CompileConfig(mode="regional", dynamic=False, cuda_graphs=True).label == "compile=regional+static+cudagraphs"


_PROBE = textwrap.dedent(
    """
    import json, os, sys, torch
    from diffusers import FluxPipeline
    from torch._dynamo.utils import counters
    from engine import EngineConfig, FluxEngine
    from engine.config import CacheConfig, CompileConfig
    from engine.models import synthetic_components

    cache_dir = sys.argv[1]
    # frames=False: this probes inductor's artefacts (with the frames loaded, inductor's cache is not asked)
    config = EngineConfig(compile=CompileConfig(mode="regional"), cache=CacheConfig(directory=cache_dir, frames=False))
    components = synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)
    eager = FluxPipeline(**components)(**KWARGS).images
    engine = FluxEngine.from_pipe(FluxPipeline(**components), config)
    images = engine(**KWARGS).images
    state = engine.compile_state
    print(json.dumps({
        "hits": counters["inductor"]["fxgraph_cache_hit"],
        "misses": counters["inductor"]["fxgraph_cache_miss"],
        "loaded": state.loaded_artifacts,
        "saved": state.saved_artifacts,
        "max_diff_vs_eager": (images - eager).abs().max().item(),
        "checksum": images.double().sum().item(),
        "environment_after": {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")},
    }))
    """
).replace(
    "KWARGS",
    "dict(prompt='a fox', height=64, width=64, num_inference_steps=2, max_sequence_length=32, output_type='pt',"
    " generator=torch.Generator().manual_seed(0))",
)


def _probe(cache_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(cache_dir)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_compile_cache_round_trip_across_processes(tmp_path):
    cold = _probe(tmp_path / "cache")
    assert cold["misses"] > 0 and not cold["loaded"] and cold["saved"]
    assert list((tmp_path / "cache" / "artifacts").glob("*.bin"))
    assert (tmp_path / "cache" / "inductor").is_dir()
    # inductor vs eager in fp32 on the tiny model: measured max |diff| 2e-6 (fused reductions)
    assert cold["max_diff_vs_eager"] < 1e-4

    # the cache folders were set for the compiling forward only, not left in the process's environment
    for value in cold["environment_after"].values():
        assert value is None or not value.startswith(str(tmp_path)), cold["environment_after"]

    warm = _probe(tmp_path / "cache")
    assert warm["loaded"]
    assert warm["misses"] == 0 and warm["hits"] >= cold["misses"]
    assert warm["checksum"] == cold["checksum"]


def test_cache_directory_follows_config_then_environment(monkeypatch, tmp_path):
    from engine.compile import cache_root

    monkeypatch.setenv("FLUX_ENGINE_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root(CacheConfig()) == tmp_path / "env"
    assert cache_root(CacheConfig(directory=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    monkeypatch.delenv("FLUX_ENGINE_CACHE_DIR")
    assert cache_root(CacheConfig()) == Path.home() / ".cache" / "flux-engine"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["none", "regional"])
def test_cuda_graphs_replay_the_transformer_per_shape(mode):
    device = "cuda"
    config = EngineConfig(
        attention=AttentionConfig(backend="auto", fused_norms=True), compile=CompileConfig(mode=mode, cuda_graphs=True)
    )
    engine = _engine(config, dtype=torch.bfloat16, device=device)
    # the same config without graphs: the same kernels (and, in regional mode, the same compiled graphs), so a
    # replay must give the same bits
    reference = _engine(
        EngineConfig(attention=config.attention, compile=CompileConfig(mode=mode)), torch.bfloat16, device
    )
    graphs = engine.compile_state.cuda_graphs
    for height, width in [(64, 64), (64, 64), (48, 80)]:
        images = engine(**tiny_call_kwargs(height=height, width=width)).images
        expected = reference(**tiny_call_kwargs(height=height, width=width)).images
        torch.testing.assert_close(images, expected, rtol=0, atol=0)
    assert graphs.captures == 2  # one per shape: the repeated size and every step replay


@pytest.mark.gpu
def test_a_new_size_runs_eagerly_once_then_is_captured():
    # the first call of a signature is its own warm-up (no forward spent on warming up alone); the next captures
    attention = AttentionConfig(backend="auto", fused_norms=True)
    config = EngineConfig(attention=attention, compile=CompileConfig(mode="none", cuda_graphs=True))
    engine = _engine(config, dtype=torch.bfloat16, device="cuda")
    graphs = engine.compile_state.cuda_graphs
    first = engine(**tiny_call_kwargs(num_inference_steps=1)).images
    assert graphs.captures == 0
    again = engine(**tiny_call_kwargs(num_inference_steps=1)).images
    assert graphs.captures == 1
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    graphs.clear()  # modules changed: the next call warms up again instead of capturing
    engine(**tiny_call_kwargs(num_inference_steps=1))
    assert graphs.captures == 1 and len(graphs.warmed) == 1


def test_the_weight_watch_sees_new_memory_and_nothing_else():
    from engine.cuda_graphs import WeightWatch

    model, watch = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)), WeightWatch()
    watch.note(model)
    with torch.no_grad():
        model[0].weight.mul_(2)  # in place: the same memory, which a graph reads as it is
    assert not watch.moved()
    model.load_state_dict({name: value.clone() for name, value in model.state_dict().items()}, assign=True)
    assert watch.moved()
    watch.note(model)
    model[1].bias.data = torch.zeros(4)
    assert watch.moved()
    watch.note(model)  # a layer replaced (PEFT's inject_adapter_in_model called directly), not moved
    model[0] = torch.nn.Linear(4, 4)
    assert watch.moved()
    watch.note(model)
    torch.nn.Sequential(torch.nn.Linear(4, 4))  # modules registered elsewhere are none of its business
    assert not watch.moved()


@pytest.mark.gpu
@pytest.mark.parametrize("move", ["to-and-back", "assign", "model-cpu-offload"])
@pytest.mark.parametrize("graphs", ["whole-forward", "fbcache-tail"])
def test_captured_graphs_follow_weights_given_new_memory(move, graphs):
    """Weights given new memory after a capture (`transformer.to("cpu").to("cuda")`, `load_state_dict(...,
    assign=True)`, accelerate's `enable_model_cpu_offload()`): before, every replay read the freed memory (NaN images,
    without a word, on diffusers' blocks under compile.cuda_graphs); now the graphs are captured again."""
    from engine.config import StepCacheConfig

    cache = StepCacheConfig("fbcache", threshold=0.0) if graphs == "fbcache-tail" else StepCacheConfig()
    engine = _engine(EngineConfig(compile=CompileConfig(mode="regional", cuda_graphs=True), step_cache=cache),
                     torch.bfloat16, "cuda")  # fmt: skip

    def call():
        return engine(**tiny_call_kwargs(height=256, width=256)).images

    call()
    before = call()  # captured, and replayed
    if move == "to-and-back":
        engine.transformer.to("cpu")
        junk = [torch.randn(1 << 20, device="cuda") for _ in range(64)]  # the freed memory taken by others
        engine.transformer.to("cuda")
    elif move == "assign":
        weights = {name: value.clone() for name, value in engine.transformer.state_dict().items()}
        engine.transformer.load_state_dict(weights, assign=True)
        junk = [torch.randn(1 << 20, device="cuda") for _ in range(64)]
    else:
        engine.enable_model_cpu_offload()
        junk = []
    for _ in range(3):  # eager again, captured again, replayed (under model offload: the weights move every call)
        torch.testing.assert_close(call(), before, rtol=0, atol=0)
    del junk


def test_shipped_artefacts_are_named_by_the_key_their_manifest_describes():
    """engine/compiled/: each shipped file's name is the key the engine computes for the card, versions, model and
    preset its MANIFEST.json entry names; a change to what the key covers (a config field) would otherwise orphan the
    file without a word (it would only miss)."""
    from engine.compile import manifest_key
    from engine.frames import read_frames

    folder = Path(__file__).resolve().parents[1] / "engine" / "compiled"
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert sorted(manifest) == sorted(path.name for path in folder.glob("*.bin")), "a file without an entry or back"
    for name, entry in manifest.items():
        assert name == f"{manifest_key(entry)}.bin", entry
    # engine.frames: each frames file beside its artefact, holding frames of classes that still exist (a renamed
    # class would only miss: the frame is looked up by its class's module and name)
    for path in folder.glob("*.frames"):
        assert f"{path.stem}.bin" in manifest and manifest[f"{path.stem}.bin"]["frames"].startswith(path.name)
        for frame in read_frames(path):
            module, _, qualname = frame.partition(":")
            assert isinstance(getattr(importlib.import_module(module), qualname), type), frame


def test_the_key_counts_the_parallel_config_only_when_it_splits_the_work():
    from dataclasses import replace

    from engine import preset
    from engine.compile import key_of
    from engine.parallel import ParallelConfig

    config = preset("compile")

    def key(parallel):
        return key_of({"torch": "t"}, "cpu", torch.float32, {"in_channels": 64}, replace(config, parallel=parallel))

    assert key(ParallelConfig()) == key(ParallelConfig(chunks=4, comm_priority="high"))
    assert key(ParallelConfig(ulysses=2)) != key(ParallelConfig())
    assert key(ParallelConfig(ulysses=2)) != key(ParallelConfig(ulysses=2, chunks=4))
