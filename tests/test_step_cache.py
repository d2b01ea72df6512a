"""Step caching (engine/stepcache) against diffusers' own hooks on the tiny model in fp32 on the CPU: the same steps
skipped and the same images, on plain diffusers maths and with our blocks, compiled without recompiles, with at most
one host sync per step; its refusals; and on the GPU with the fastest preset's CUDA graphs."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

from engine import EngineConfig, FluxEngine, restore
from engine.config import AttentionConfig, CompileConfig
from engine.errors import ConfigError, InputError
from engine.models import synthetic_components
from engine.stepcache import StepCacheConfig, parse_step_cache, taylorseer_computes

STEPS = 12


def _call(pipe, **overrides) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a fox", height=64, width=64, num_inference_steps=STEPS, max_sequence_length=32,
                output_type="pt", generator=torch.Generator().manual_seed(0))  # fmt: skip
    return pipe(**{**call, **overrides}).images


def _diffusers_with(cache_config):
    """diffusers' FluxPipeline with its own cache hook, and a counter of the last block's full runs."""
    pipe = diffusers.FluxPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32))
    pipe.transformer.enable_cache(cache_config)
    runs = []
    pipe.transformer.single_transformer_blocks[-1].norm.register_forward_pre_hook(lambda *_: runs.append(1))
    return pipe, runs


def _engine(step_cache: StepCacheConfig, **parts) -> FluxEngine:
    return FluxEngine.from_pretrained("synthetic:tiny", EngineConfig(step_cache=step_cache, **parts), device="cpu")


# on the tiny random model the first block's residual changes by 0.3-0.5 a step: 0.3 skips nothing, 0.4 two steps,
# 0.45 four (measured)
@pytest.mark.parametrize(("threshold", "skipped"), [(0.0, 0), (0.3, 0), (0.4, 2), (0.45, 4)])
def test_first_block_cache_skips_diffusers_steps_with_diffusers_images(threshold, skipped):
    plain, runs = _diffusers_with(FirstBlockCacheConfig(threshold=threshold))
    expected = _call(plain)
    engine = _engine(StepCacheConfig("fbcache", threshold=threshold))
    images = _call(engine)
    decisions = engine.step_cache_state.last_call()["cond"]
    assert len(decisions) == STEPS and decisions.count(False) == skipped
    assert decisions.count(True) == len(runs)  # the steps diffusers ran its last block in
    assert torch.equal(images, expected)


@pytest.mark.parametrize(("interval", "order", "warmup"), [(5, 1, 3), (3, 2, 3), (4, 0, 2)])
def test_taylorseer_skips_diffusers_steps_with_diffusers_images(interval, order, warmup):
    """Against diffusers' TaylorSeer in lite mode (the transformer's output extrapolated, every block skipped)."""
    config = TaylorSeerCacheConfig(cache_interval=interval, max_order=order, disable_cache_before_step=warmup,
                                   use_lite_mode=True)  # fmt: skip
    plain, runs = _diffusers_with(config)
    expected = _call(plain)
    step_cache = StepCacheConfig("taylorseer", interval=interval, order=order, warmup=warmup)
    engine = _engine(step_cache)
    images = _call(engine)
    decisions = engine.step_cache_state.last_call()["cond"]
    assert decisions == [taylorseer_computes(step_cache, step) for step in range(STEPS)]
    assert decisions.count(True) == len(runs) < STEPS
    assert torch.equal(images, expected)


def test_threshold_zero_is_the_uncached_preset_to_the_bit_and_restore_removes_the_cache():
    uncached = _call(FluxEngine.from_pretrained("synthetic:tiny", "baseline", device="cpu"))
    engine = _engine(StepCacheConfig("fbcache", threshold=0.0))
    assert torch.equal(_call(engine), uncached)
    cached = _engine(StepCacheConfig("fbcache", threshold=0.45))
    assert not torch.equal(_call(cached), uncached)
    restore(cached)
    assert torch.equal(_call(cached), uncached)


def test_with_our_blocks_the_decisions_are_the_plain_ones():
    """The fused blocks differ from diffusers' by fp32 rounding (~1e-6, tests/test_engine_attention.py), far below the
    distance of any step's change from these thresholds (0.3-0.5 against 0.4 / 0.45): the same steps are skipped."""
    fused = {"attention": AttentionConfig(backend="auto")}
    for threshold in (0.4, 0.45):
        plain = _engine(StepCacheConfig("fbcache", threshold=threshold))
        expected = _call(plain)
        engine = _engine(StepCacheConfig("fbcache", threshold=threshold), **fused)
        images = _call(engine)
        assert engine.step_cache_state.last_call() == plain.step_cache_state.last_call()
        torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["fbcache", "taylorseer"])
def test_compiled_cache_recompiles_nothing_across_steps_and_sizes_and_syncs_at_most_once_a_step(mode, monkeypatch):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    compiled = {"compile": CompileConfig(mode="regional", backend="aot_eager")}
    step_cache = StepCacheConfig(mode, threshold=0.45) if mode == "fbcache" else StepCacheConfig(mode, interval=3)
    engine = _engine(step_cache, **compiled)
    _call(engine, num_inference_steps=2)  # compiles
    graphs = counters["stats"]["unique_graphs"]
    syncs = []
    original_item = torch.Tensor.item

    def counted_item(tensor):
        syncs.append(1)
        return original_item(tensor)

    monkeypatch.setattr(torch.Tensor, "item", counted_item)
    with torch._dynamo.config.patch(error_on_recompile=True):
        cached = _call(engine)
        _call(engine, height=96, width=128)
    assert counters["stats"]["unique_graphs"] == graphs
    cached_syncs = len(syncs)
    syncs.clear()
    uncached = _engine(StepCacheConfig(), **compiled)  # the same config without the cache
    _call(uncached)
    _call(uncached, height=96, width=128)
    extra = cached_syncs - len(syncs)  # the cache's syncs, less what the skipped steps did not sync, over 2 calls
    assert 0 < extra <= 2 * (STEPS - 1) if mode == "fbcache" else extra <= 0  # fbcache: one a step but the first
    assert engine.step_cache_state.last_call()["cond"].count(False) > 0 and cached.isfinite().all()


def test_static_schedule_runs_its_steps_and_refuses_steps_that_do_not_exist():
    steps = (0, 1, 3, 7)
    engine = _engine(StepCacheConfig("static", steps=steps, order=0))
    _call(engine)
    assert [step for step, full in enumerate(engine.step_cache_state.last_call()["cond"]) if full] == list(steps)
    calls = []
    hook = engine.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(InputError, match=r"step_cache.steps names step\(s\) \[7\] but the call runs 6 steps"):
        _call(engine, num_inference_steps=6)
    hook.remove()
    assert not calls


def test_the_cache_works_in_the_other_pipeline_classes():
    """diffusers' own cache hooks need a cache context that only FluxPipeline sets; ours count img2img's steps too
    (threshold 0: the uncached image to the bit)."""
    from engine.tasks import synthetic_inputs

    inputs = synthetic_inputs("img2img", 64, 64)
    uncached = _call(FluxEngine.from_pretrained("synthetic:tiny", "baseline", device="cpu", task="img2img"), **inputs)
    config = EngineConfig(step_cache=StepCacheConfig("fbcache", threshold=0.0))
    engine = FluxEngine.from_pretrained("synthetic:tiny", config, device="cpu", task="img2img")
    assert torch.equal(_call(engine, **inputs), uncached)
    # strength 0.6: diffusers skips the first int(12 - 12 * 0.6) = 4 steps, 8 run
    assert len(engine.step_cache_state.last_call()["cond"]) == STEPS - int(STEPS - STEPS * 0.6) == 8


def test_a_static_schedule_past_the_steps_strength_leaves_is_refused():
    """Before: static steps (0, 1, 3, 9) on img2img with 12 steps at strength 0.6 (8 run) ran full steps at 0, 1, 3
    only, without a word (the check counted num_inference_steps)."""
    from engine.tasks import synthetic_inputs

    config = EngineConfig(step_cache=StepCacheConfig("static", steps=(0, 1, 3, 9), order=0))
    engine = FluxEngine.from_pretrained("synthetic:tiny", config, device="cpu", task="img2img")
    with pytest.raises(InputError, match=r"names step\(s\) \[9\] but the call runs 8 steps \(strength=0.6\)"):
        _call(engine, **synthetic_inputs("img2img", 64, 64))
    _call(engine, **synthetic_inputs("img2img", 64, 64), strength=1.0)  # all 12 run
    assert [step for step, full in enumerate(engine.step_cache_state.last_call()["cond"]) if full] == [0, 1, 3, 9]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: StepCacheConfig("teacache"), "step_cache.mode='teacache' is not one of"),
        (lambda: StepCacheConfig("fbcache", threshold=1.5), r"threshold=1.5 is outside \[0, 1\]"),
        (lambda: StepCacheConfig("taylorseer", interval=0), "step_cache.interval=0 must be an integer >= 1"),
        (lambda: StepCacheConfig("taylorseer", order=3), "step_cache.order=3 must be 0, 1 or 2"),
        (lambda: StepCacheConfig("static", steps=(1, 2)), "must start with 0"),
        (lambda: StepCacheConfig("static", steps=(0, 3, 2)), "must be increasing"),
        (lambda: StepCacheConfig("taylorseer", steps=(0,)), "step_cache.steps is for mode 'static'"),
        (lambda: parse_step_cache("fbcache:high"), "--cache 'fbcache:high': could not convert"),
        (lambda: parse_step_cache("taylorseer"), "--cache 'taylorseer' is not a step cache; use fbcache:THRESHOLD"),
    ],
)  # fmt: skip
def test_bad_step_caches_are_refused_naming_the_fix(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_parse_step_cache():
    assert parse_step_cache("fbcache:0.08") == StepCacheConfig("fbcache", threshold=0.08)
    assert parse_step_cache("taylorseer:5:2") == StepCacheConfig("taylorseer", interval=5, order=2)
    assert parse_step_cache("static:0,1,2,4,9:0") == StepCacheConfig("static", steps=(0, 1, 2, 4, 9), order=0)
    assert StepCacheConfig("taylorseer").full_steps(28) == [0, 1, 2, 4, 9, 14, 19, 24]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="our kernels, fp8 and CUDA graphs need CUDA")
def test_taylorseer_on_the_fastest_preset_keeps_its_cuda_graphs():
    """fp8-compile-fastacc-cudagraphs-taylorseer: the full steps replay the captured graph, the skipped ones run
    nothing; no recompile across steps and sizes; the image within fp8's tolerance of diffusers' TaylorSeer."""
    from engine.measure import psnr

    plain = diffusers.FluxPipeline(**synthetic_components("tiny", device="cuda", dtype=torch.bfloat16))
    plain.transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=5, use_lite_mode=True))
    expected = _call(plain)
    engine = FluxEngine.from_pretrained("synthetic:tiny", "fp8-compile-fastacc-cudagraphs-taylorseer", device="cuda")
    _call(engine)
    graphs = engine.compile_state.cuda_graphs
    captures = graphs.captures
    with torch._dynamo.config.patch(error_on_recompile=True):
        images = _call(engine)
    full = sum(taylorseer_computes(StepCacheConfig("taylorseer", interval=5), step) for step in range(STEPS))
    assert graphs.captures == captures and engine.step_cache_state.last_call()["cond"].count(True) == full == 5
    assert psnr(images, expected) >= 35.0  # fp8 weights on the tiny model in bf16 (tests/test_tasks.py)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("threshold", [0.0, 0.45])
def test_first_block_cache_under_cuda_graphs_replays_the_blocks_after_the_decider(threshold):
    """fbcache with compile.cuda_graphs: the blocks after the second replay as one graph per size on full steps and
    give the bits of the same config without graphs (the same kernels), the same decisions; no recompile, no new
    capture once a size was seen; no whole-forward graph."""
    cache = StepCacheConfig("fbcache", threshold=threshold)
    parts = dict(attention=AttentionConfig(backend="auto", fused_norms=True), step_cache=cache)
    # the reference compiles the same regions (eager blocks round differently from inductor's fused kernels)
    plain = FluxEngine.from_pretrained(
        "synthetic:tiny", EngineConfig(compile=CompileConfig(mode="regional"), **parts), device="cuda"
    )
    engine = FluxEngine.from_pretrained(
        "synthetic:tiny", EngineConfig(compile=CompileConfig(mode="regional", cuda_graphs=True), **parts), device="cuda"
    )
    assert engine.compile_state.cuda_graphs is None
    graphs = engine.step_cache_state.tail_graphs
    sizes = [(64, 64), (48, 80), (64, 64)]
    for index, (height, width) in enumerate(sizes):
        expected = _call(plain, height=height, width=width)
        if index == len(sizes) - 1:
            captures = graphs.captures
            with torch._dynamo.config.patch(error_on_recompile=True):
                images = _call(engine, height=height, width=width)
            assert graphs.captures == captures  # a size seen before: replays only
        else:
            images = _call(engine, height=height, width=width)
        torch.testing.assert_close(images, expected, rtol=0, atol=0)
        assert engine.step_cache_state.last_call() == plain.step_cache_state.last_call()
    assert graphs.captures == 2 and len(graphs.graphs) == 2
    full = engine.step_cache_state.last_call()["cond"].count(True)
    assert full == STEPS if threshold == 0.0 else 2 <= full < STEPS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_a_hook_on_the_first_block_runs_every_step_without_a_new_tail_capture_on_the_gpu():
    """The first two blocks run outside First-Block Cache's tail graphs: a hook put there after the capture runs at
    every step, and the graphs replay as they are (before: captured again, with a warning that did not hold)."""
    parts = dict(attention=AttentionConfig(backend="auto", fused_norms=True),
                 step_cache=StepCacheConfig("fbcache", threshold=0.0))  # fmt: skip
    engine = FluxEngine.from_pretrained(
        "synthetic:tiny", EngineConfig(compile=CompileConfig(mode="regional", cuda_graphs=True), **parts), device="cuda"
    )
    expected = [_call(engine) for _ in range(2)][-1]  # the second call captures
    graphs = engine.step_cache_state.tail_graphs
    captures, seen = graphs.captures, []
    engine.transformer.transformer_blocks[0].register_forward_hook(lambda module, args, out: seen.append(1))
    torch.testing.assert_close(_call(engine), expected, rtol=0, atol=0)
    assert graphs.captures == captures and len(seen) == STEPS


def test_bench_cache_runs_each_config_uncached_then_cached_beside_diffusers_own_hook(tmp_path, capsys):
    """engine.bench --cache taylorseer:3: the engine config with the cache against diffusers with its own TaylorSeer
    (the same image to the bit on the baseline maths: an 'inf' PSNR), and against itself uncached (same process)."""
    import json

    from engine.bench import cli

    out = tmp_path / "cache.json"
    argv = ["--res", "64", "--steps", "8", "--preset", "baseline", "--cache", "taylorseer:3", "--device", "cpu"]
    assert cli.main([*argv, "--allow-any-size", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["step_cache"] == result["baseline_cache"] == "taylorseer:3"
    row = next(row for row in result["rows"] if row["config"] != "diffusers")
    cache = row["step_cache"]
    full = sum(taylorseer_computes(StepCacheConfig("taylorseer", interval=3), step) for step in range(8))
    assert (cache["full_steps"], cache["skipped_steps"]) == (full, 8 - full) == (5, 3)
    assert row["psnr_db"] == "inf" and 20 < cache["psnr_vs_uncached_db"] < 200 and 0 < cache["ssim_vs_uncached"] < 1
    assert cache["uncached_total_s"] > 0 and cache["latent_err_vs_uncached"] > 0
    assert "vs diffusers with its taylorseer:3" in capsys.readouterr().out


def test_ssim_is_one_for_equal_images_and_falls_with_noise():
    from engine.measure import ssim

    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    noisy = (image + 0.1 * torch.randn(image.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert ssim(image, image) == pytest.approx(1.0)
    assert 0.5 < ssim(noisy, image) < 0.99 and abs(ssim(torch.rand_like(image), image)) < 0.1


def test_a_diffusers_cache_disabled_before_optimize_leaves_no_trace_and_one_still_on_is_refused():
    """diffusers' hooks replace each block's forward on the instance; disabled, they leave the class's bound forward
    there, which would shadow the fused block's (diffusers' processors on the fused projections)."""
    from engine import optimize

    fused = EngineConfig(attention=AttentionConfig(backend="auto"))
    expected = _call(FluxEngine.from_pretrained("synthetic:tiny", fused, device="cpu"))
    pipe = diffusers.FluxPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32))
    pipe.transformer.enable_cache(TaylorSeerCacheConfig(use_lite_mode=True))
    pipe.transformer.disable_cache()
    torch.testing.assert_close(_call(optimize(pipe, fused)), expected, atol=0, rtol=0)
    hooked = diffusers.FluxPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32))
    hooked.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ConfigError, match=r"hook .*pipe.transformer.disable_cache\(\).*step_cache"):
        optimize(hooked, fused)


def test_a_lora_under_taylorseer_makes_diffusers_image_with_both():
    """An adapter loaded on the cached engine: the image of diffusers with the same adapter and its own TaylorSeer."""
    from engine.lora import synthetic_lora

    plain, _ = _diffusers_with(TaylorSeerCacheConfig(cache_interval=3, use_lite_mode=True))
    lora = synthetic_lora(plain.transformer, 4, seed=1)
    plain.load_lora_weights(dict(lora), adapter_name="style")
    engine = _engine(StepCacheConfig("taylorseer", interval=3))
    engine.load_lora_weights(dict(lora), adapter_name="style")
    assert torch.equal(_call(engine), _call(plain))
    assert engine.step_cache_state.last_call()["cond"].count(False) > 0


def test_the_controlnet_pipeline_caches_its_steps_too():
    """FluxControlNetPipeline sets no cache context (diffusers' hooks fail there); ours count its steps, threshold 0
    is its uncached image to the bit, and a threshold that skips changes it."""
    from PIL import Image

    control = {"control_image": Image.new("RGB", (64, 64), (90, 160, 40)), "controlnet_conditioning_scale": 0.7}

    def controlnet_engine(threshold):
        config = EngineConfig(step_cache=StepCacheConfig("fbcache", threshold=threshold))
        return FluxEngine.from_pretrained("synthetic:tiny", config, device="cpu", task="controlnet",
                                          controlnet="synthetic:tiny")  # fmt: skip

    uncached = _call(FluxEngine.from_pretrained("synthetic:tiny", "baseline", device="cpu", task="controlnet",
                                                controlnet="synthetic:tiny"), **control)  # fmt: skip
    assert torch.equal(_call(controlnet_engine(0.0), **control), uncached)
    skipping = controlnet_engine(1.0)
    assert not torch.equal(_call(skipping, **control), uncached)
    assert skipping.step_cache_state.last_call()["cond"] == [True] + [False] * (STEPS - 1)  # relative change <= 1


@pytest.mark.parametrize("policy", ["block", "leaf"])
def test_taylorseer_under_streamed_offload_skips_the_same_steps_with_the_same_image(policy):
    """A skipped step runs nothing, so nothing streams; the full steps stream as without the cache. First-Block Cache
    is refused there (tests above): it skips blocks the streamer brings in order."""
    from engine.config import OffloadConfig

    step_cache = StepCacheConfig("taylorseer", interval=3)
    resident = _engine(step_cache)
    streamed = _engine(step_cache, offload=OffloadConfig(policy=policy))
    assert streamed.offload_state is not None
    assert torch.equal(_call(streamed), _call(resident))
    assert streamed.step_cache_state.last_call() == resident.step_cache_state.last_call()
    with pytest.raises(ConfigError, match="fbcache skips blocks that offload.policy"):
        EngineConfig(offload=OffloadConfig(policy=policy), step_cache=StepCacheConfig("fbcache"))


def test_generate_with_a_cache_and_the_fbcache_config_name(tmp_path):
    """engine.generate --cache: the cached image of the engine; fbcache on a CUDA-graph preset keeps the graphs (those
    of the blocks after the decider)."""
    import numpy as np
    from PIL import Image

    from engine import generate
    from engine.config import PRESETS
    from engine.stepcache import with_step_cache

    argv = ["a fox", "--res", "64", "--steps", "6", "--device", "cpu", "--cache", "taylorseer:2", "-o"]
    assert generate.main([*argv, str(tmp_path / "fox.png")]) == 0
    engine = _engine(StepCacheConfig("taylorseer", interval=2))
    expected = _call(engine, prompt="a fox", num_inference_steps=6, max_sequence_length=64, output_type="pil")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "fox.png")), np.asarray(expected[0]))
    config = with_step_cache(PRESETS["fp8-compile-fastacc-cudagraphs"], StepCacheConfig("fbcache", threshold=0.1))
    assert config.label == "fp8-compile-fastacc-cudagraphs+fbcache:0.1" and config.compile.cuda_graphs


def test_the_cache_profile_script_parses_its_arguments():
    """benchmarks/profile_cache.py (GPU only) imports and answers --help on any machine."""
    from benchmarks import profile_cache

    with pytest.raises(SystemExit) as exit_info:
        profile_cache.main(["--help"])
    assert exit_info.value.code == 0


def test_a_call_whose_blocks_a_tail_graph_would_bake_in_is_marked_so():
    """First-Block Cache's tail graph (CUDA only) must not replay a call with a LoRA scale (diffusers multiplies it into
    PEFT's float scales before the blocks run) or ControlNet residuals: the hook marks such a call, on any device."""
    engine = _engine(StepCacheConfig("fbcache", threshold=0.0))
    hook = engine.step_cache_state.hook
    _call(engine, num_inference_steps=2)
    assert hook.plain_forward
    _call(engine, num_inference_steps=2, joint_attention_kwargs={"scale": 0.5})
    assert not hook.plain_forward  # TailGraphs.usable refuses the step's graph then
    _call(engine, num_inference_steps=2)
    assert hook.plain_forward


def _true_cfg_reference(task: str, cache_config):
    """diffusers' class for `task` with its own hook, its two calls a step named 'cond' and 'uncond' as FluxPipeline
    names them (the other classes name none, and diffusers' hooks fail there)."""
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    from engine.tasks import TASKS

    pipe = getattr(diffusers, TASKS[task].pipeline_class)(**synthetic_components("tiny", device="cpu",
                                                                                 dtype=torch.float32))  # fmt: skip
    pipe.transformer.enable_cache(cache_config)
    calls = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args: calls.append(_set_cache_context(module, CacheContext(("cond", "uncond")[len(calls) % 2])))
    )
    return pipe


@pytest.mark.parametrize("task", ["img2img", "kontext"])
def test_true_cfg_on_the_task_classes_caches_each_prompt_apart(task):
    """Before: img2img, inpaint, Kontext (the classes that name no cache context) ran true CFG's two calls a step in
    one context: each step counted twice and TaylorSeer extrapolated between the prompts (0.096 from diffusers'
    hook with the calls named, on img2img). Now the second call with a step's latents is 'uncond'."""
    from engine.tasks import synthetic_inputs

    config = TaylorSeerCacheConfig(cache_interval=3, max_order=1, disable_cache_before_step=2, use_lite_mode=True)
    inputs = {**synthetic_inputs(task, 64, 64), "true_cfg_scale": 2.0, "negative_prompt": "blurry"}
    if task == "kontext":
        inputs["_auto_resize"] = False
    expected = _call(_true_cfg_reference(task, config), **inputs)
    engine = FluxEngine.from_pretrained("synthetic:tiny", EngineConfig(step_cache=StepCacheConfig(
        "taylorseer", interval=3, warmup=2, order=1)), device="cpu", task=task)  # fmt: skip
    assert torch.equal(_call(engine, **inputs), expected)
    decisions = engine.step_cache_state.last_call()
    assert decisions["cond"] == decisions["uncond"] and decisions["cond"].count(False) > 0


def test_a_call_after_one_that_failed_mid_way_starts_its_steps_afresh():
    """Before: a diffusers FluxPipeline optimised in place (its own __call__, which resets the cache only at its
    end) went on from the steps of a call that raised mid-way: 0.03-0.12 from diffusers. A call's new prompt ids
    now reset the cache."""
    from engine import optimize

    config = TaylorSeerCacheConfig(cache_interval=3, max_order=1, disable_cache_before_step=2, use_lite_mode=True)
    expected = _call(_diffusers_with(config)[0])
    pipe = diffusers.FluxPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32))
    optimize(pipe, EngineConfig(step_cache=StepCacheConfig("taylorseer", interval=3, warmup=2, order=1)))

    def fail_at_step_4(pipe, step, timestep, outputs):
        if step == 4:
            raise KeyboardInterrupt
        return outputs

    with pytest.raises(KeyboardInterrupt):
        _call(pipe, callback_on_step_end=fail_at_step_4)
    assert torch.equal(_call(pipe), expected)
    assert len(pipe.step_cache_state.last_call()["cond"]) == STEPS


def test_the_blocks_iterate_as_themselves_outside_the_forward_under_first_block_cache():
    """Before: `for block in transformer.transformer_blocks` under fbcache yielded the engine's per-step wrappers
    (`block.attn`, `block.register_forward_hook`: AttributeError). A hook registered that way runs in full steps."""
    engine = _engine(StepCacheConfig("fbcache", threshold=0.45))
    runs = []
    for block in engine.transformer.transformer_blocks:
        assert isinstance(block, diffusers.models.transformers.transformer_flux.FluxTransformerBlock)
    singles = engine.transformer.single_transformer_blocks
    for block in singles:  # after the first two blocks: they run in full steps only
        block.register_forward_hook(lambda *_: runs.append(1))
    _call(engine)
    full = engine.step_cache_state.last_call()["cond"].count(True)
    assert 0 < full < STEPS and len(runs) == len(singles) * full


def test_a_retry_with_the_same_latents_after_a_failure_between_the_two_cfg_calls():
    """A review found: img2img under true CFG with the user's latents, failing between step 0's two calls, then the
    same call again: the retry's first call (same latents object) was taken for 'uncond' and the schedule shifted by
    one (0.04 from a clean run, 11 of 12 steps recorded). A new pipeline call is told by its img_ids now."""
    from engine import optimize
    from engine.tasks import synthetic_inputs

    config = EngineConfig(step_cache=StepCacheConfig("taylorseer", interval=3, warmup=2, order=1))
    latents = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(1))
    inputs = {**synthetic_inputs("img2img", 64, 64), "strength": 1.0, "latents": latents, "true_cfg_scale": 2.0,
              "negative_prompt": "blurry"}  # fmt: skip

    def pipe():
        return optimize(diffusers.FluxImg2ImgPipeline(**synthetic_components("tiny", device="cpu",
                                                                            dtype=torch.float32)), config)  # fmt: skip

    expected = _call(pipe(), **inputs)
    retried, calls = pipe(), []

    def fail_at_the_second_call(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    handle = retried.transformer.register_forward_pre_hook(fail_at_the_second_call)
    with pytest.raises(KeyboardInterrupt):
        _call(retried, **inputs)
    handle.remove()
    assert torch.equal(_call(retried, **inputs), expected)
    assert len(retried.step_cache_state.last_call()["uncond"]) == STEPS


def test_first_block_cache_with_a_controlnet_is_diffusers_hook_to_the_bit():
    """diffusers' head hook adds the cached residual to the first block's output before the transformer adds the first
    ControlNet residual; ours skips at the second block, where the two were once added in the other order (1.7e-6 in
    fp32). The diffusers reference runs its hook under a named context (the ControlNet class sets none)."""
    from diffusers import FluxControlNetPipeline
    from PIL import Image

    from engine import optimize
    from engine.models import synthetic_controlnet

    def pipeline():
        return FluxControlNetPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32),
                                      controlnet=synthetic_controlnet("tiny", dtype=torch.float32, seed=1))  # fmt: skip

    control = {"control_image": Image.new("RGB", (64, 64), (90, 160, 40)), "controlnet_conditioning_scale": 0.7}
    plain = pipeline()
    plain.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.45))
    with plain.transformer.cache_context("cond"):
        expected = _call(plain, **control)
    ours = optimize(pipeline(), EngineConfig(step_cache=StepCacheConfig("fbcache", threshold=0.45)))
    images = _call(ours, **control)
    assert ours.step_cache_state.last_call()["cond"].count(False) > 0  # steps were skipped
    assert torch.equal(images, expected)


def test_the_tail_graphs_watch_the_hooks_of_the_blocks_they_replay_only():
    """First-Block Cache's tail graphs replay the blocks after the second; the first two run at every step outside
    them, so a hook put there is no reason to capture again (nor to warn that it runs only while capturing)."""
    from engine.stepcache.graphs import TailGraphs

    transformer = synthetic_components("tiny", device="cpu", dtype=torch.float32)["transformer"]
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    graphs = TailGraphs(len(blocks) - 2, transformer)
    graphs.note_capture()  # what a capture notes
    for outside in (transformer, *blocks[:2]):
        handle = outside.register_forward_hook(lambda module, args, out: out)
        assert not graphs.watch.moved()
        handle.remove()
    handle = blocks[2].attn.register_forward_pre_hook(lambda module, args: None)
    assert graphs.watch.moved()  # inside the replayed segment
