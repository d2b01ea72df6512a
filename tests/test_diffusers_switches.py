"""diffusers' own runtime switches on an optimised pipeline (found by probing the drop-in on the tiny model,
2026-12-03): each must either act as in diffusers or be refused, never be dropped without a word. The reference is
diffusers' own pipeline with the same switch; kernels under the Triton interpreter on the CPU."""

import pytest
import torch
from conftest import tiny_call_kwargs
from diffusers import FluxPipeline, TaylorSeerCacheConfig
from diffusers.hooks import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

from engine import EngineConfig, optimize
from engine.config import CacheConfig, CompileConfig, OffloadConfig
from engine.errors import ConfigError
from engine.models import synthetic_components


def _pipe(seed: int = 0) -> FluxPipeline:
    pipe = FluxPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, **overrides) -> torch.Tensor:
    return pipe(**tiny_call_kwargs(**overrides)).images


def _clip_lora(pipe) -> None:
    """A text-encoder (CLIP) LoRA in diffusers' format, as a user loads one with load_lora_weights."""
    generator, state = torch.Generator().manual_seed(1), {}
    for i, layer in enumerate(pipe.text_encoder.encoder.layers):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear = getattr(layer.self_attn, proj)
            prefix = f"text_encoder.encoder.layers.{i}.self_attn.{proj}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(4, linear.in_features, generator=generator) * 0.5
            state[f"{prefix}.lora_B.weight"] = torch.randn(linear.out_features, 4, generator=generator) * 0.5
    pipe.load_lora_weights(state, adapter_name="te")


OFFLOADED = EngineConfig(offload=OffloadConfig(policy="model"))


@pytest.mark.parametrize("change", ["clip-lora", "t5-in-place", "clip-tensor-replaced"])
def test_the_prompt_cache_follows_the_text_encoders(change):
    """Before: under an offload policy the prompt cache kept the embeddings of the text encoders as they were at the
    first call (a text-encoder LoRA: 0.064 from diffusers; weights edited in place or replaced: 0.02-0.05). Now it is
    dropped when they change (and off while an encoder carries PEFT adapters); a repeated prompt still hits."""
    reference, engine = _pipe(), optimize(_pipe(), OFFLOADED)
    torch.testing.assert_close(_image(engine), _image(reference), atol=1e-5, rtol=0)
    _image(engine)
    assert engine.offload_state.prompt_cache.hits == 1  # nothing changed: the cache serves the repeat
    for pipe in (reference, engine):
        if change == "clip-lora":
            _clip_lora(pipe)
        elif change == "t5-in-place":
            with torch.no_grad():
                pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight.mul_(3.0)
        else:
            linear = pipe.text_encoder.encoder.layers[0].self_attn.q_proj
            linear.weight.data = linear.weight.data * 3.0
    expected = _image(reference)
    assert (expected - _image(_pipe())).abs().max() > 1e-3  # the change changes diffusers' image
    torch.testing.assert_close(_image(engine), expected, atol=1e-5, rtol=0)


def test_a_text_encoder_replaced_under_offload_is_refused():
    engine = optimize(_pipe(), OFFLOADED)
    engine.text_encoder_2 = synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=7)["text_encoder_2"]
    with pytest.raises(ConfigError, match=r"pipe.text_encoder_2 was replaced after optimize\(\) with offload policy"):
        _image(engine)


def test_a_projection_given_a_new_weight_tensor_reaches_the_fused_layer():
    """Before: `.weight.data = ...` or a new Parameter on to_q / proj_mlp after optimize('kernels') changed diffusers'
    image by 0.12 and the engine's not at all (the fused QKV / linear1 kept the old values)."""

    def edit(pipe):
        for block in pipe.transformer.transformer_blocks:
            block.attn.to_q.weight.data = block.attn.to_q.weight.data * 3.0
        for block in pipe.transformer.single_transformer_blocks:
            block.proj_mlp.weight = torch.nn.Parameter(block.proj_mlp.weight.detach() * 3.0)

    reference, engine = _pipe(), optimize(_pipe(), "kernels")
    _image(engine)
    edit(reference), edit(engine)
    torch.testing.assert_close(_image(engine), _image(reference), atol=1e-5, rtol=0)


def _pab(pipe):
    return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(
        -1, 1001), current_timestep_callback=lambda: pipe._current_timestep)  # fmt: skip


def test_diffusers_cache_hooks_on_the_attention_modules_are_refused_before_and_after_optimize():
    """Before: PyramidAttentionBroadcast (or TaylorSeer) enabled before optimize('kernels'), or applied to the
    transformer directly after it, stayed 'enabled' and never ran: diffusers' uncached image."""
    from diffusers.hooks import apply_pyramid_attention_broadcast

    pipe = _pipe()
    pipe.transformer.enable_cache(_pab(pipe))
    with pytest.raises(ConfigError, match=r"transformer_blocks.0.attn carries diffusers hooks"):
        optimize(pipe, "kernels")
    engine = optimize(_pipe(), "kernels")
    apply_pyramid_attention_broadcast(engine.transformer, _pab(engine))
    with pytest.raises(ConfigError, match=r"carries diffusers hooks .*pyramid"):
        _image(engine)


def test_layerwise_casting_before_optimize_is_refused():
    pipe = _pipe()
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    with pytest.raises(ConfigError, match=r"carries diffusers hooks \['layerwise_casting'\]"):
        optimize(pipe, "kernels")


def test_a_cache_hook_on_the_blocks_is_refused_before_compiling_them():
    """Before: FirstBlockCache enabled before optimize('compile') was compiled over: diffusers' uncached image."""
    pipe = _pipe()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    with pytest.raises(ConfigError, match=r"forward replaced by fbc.* enable a cache after optimize"):
        optimize(pipe, "compile")
    assert not hasattr(pipe, "compile_state") or pipe.compile_state is None  # nothing was done


@pytest.mark.parametrize(("method", "args", "fix"), [
    ("set_attention_backend", ("_native_math",), "AttentionConfig"),
    ("compile_repeated_blocks", (), "kernels-compile"),
])  # fmt: skip
def test_diffusers_methods_the_fused_blocks_would_ignore_are_refused(method, args, fix):
    """Before: set_attention_backend changed nothing (diffusers' image moves), compile_repeated_blocks failed
    inside diffusers ("classes are not found")."""
    engine = optimize(_pipe(), "kernels")
    with pytest.raises(ConfigError, match=rf"{method}\(\) after optimize\(\) would change nothing: .*{fix}"):
        getattr(engine.transformer, method)(*args)


def test_a_dtype_the_kernels_do_not_take_is_refused_at_optimize():
    pipe = _pipe().to(torch.float64)
    with pytest.raises(ConfigError, match=r"is torch.float64; the engine's fused kernels take"):
        optimize(pipe, "kernels")


def test_the_encoders_fingerprint_is_stable_for_absent_parts_and_changes_with_a_new_tensor():
    from types import SimpleNamespace

    from engine.offload.prompt_cache import PromptCache, encoders_fingerprint

    encoder = torch.nn.Linear(4, 4)
    pipe = SimpleNamespace(text_encoder=encoder, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    cache = PromptCache(4)
    cache.check_encoders(encoders_fingerprint(pipe))
    cache.put(("a fox",), "embeddings")
    cache.check_encoders(encoders_fingerprint(pipe))  # nothing changed (absent parts included): kept
    assert cache.get(("a fox",)) == "embeddings"
    encoder.weight = torch.nn.Parameter(torch.zeros(4, 4))
    cache.check_encoders(encoders_fingerprint(pipe))
    assert cache.get(("a fox",)) is None


@pytest.mark.parametrize("task", ["text-to-image", "kontext"])
@pytest.mark.parametrize("source", ["/no/such/style.safetensors", "someuser/some-lora-repo"])
def test_an_engine_on_any_preset_never_sends_a_lora_name_to_the_hub(task, source):
    """Before: on 'baseline' and 'tiled-vae' (FluxEngine.from_pretrained's default), which leave diffusers' LoRA
    calls alone, a name that is not a local path went to diffusers, which tried the hub (a network error here)."""
    from engine import FluxEngine
    from engine.errors import CheckpointError

    for config in ("baseline", "tiled-vae"):
        engine = FluxEngine.from_pretrained("synthetic:tiny", config, device="cpu", task=task)
        with pytest.raises(CheckpointError, match=r"does not exist; .*nothing is downloaded"):
            engine.load_lora_weights(source)


@pytest.mark.gpu
def test_a_second_pipeline_over_a_compiled_transformer_keeps_its_frames_on_the_gpu():
    """The refusal of a block forward replaced by a hook (check_hooked_forward) runs at a pipeline's first optimize()
    only: a second pipeline over the same compiled transformer (its blocks run the engine's frames) is not refused."""
    from engine import FluxEngine

    preset = "fp8-compile-fastacc-cudagraphs"
    first = FluxEngine.from_pretrained("synthetic:tiny", preset, device="cuda", dtype=torch.bfloat16)
    image = _image(first)
    second = FluxEngine.from_pipe(first, preset)
    assert torch.equal(_image(second), image)


def test_text_encoders_set_to_none_under_offload_with_prompt_embeddings_given():
    """diffusers' memory saver (encode once, drop the encoders, call with the embeddings) under offload: before the
    review fix the replaced-encoder refusal took None for a new encoder."""
    reference, engine = _pipe(), optimize(_pipe(), OFFLOADED)
    embeds = {}
    for pipe in (reference, engine):
        prompt_embeds, pooled, _ = pipe.encode_prompt("a red fox in the snow", None, max_sequence_length=32)
        pipe.text_encoder = pipe.text_encoder_2 = None
        embeds[id(pipe)] = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled, "prompt": None}
    torch.testing.assert_close(_image(engine, **embeds[id(engine)]), _image(reference, **embeds[id(reference)]),
                               atol=1e-5, rtol=0)  # fmt: skip


def test_a_fused_part_is_followed_after_restore_and_a_second_optimize():
    """The per-call check reads a list of the fused parts kept on the model; after a restore and another optimize()
    (new fused layers over the same parts) a part given a new tensor still reaches the fused layer."""
    from engine import restore

    reference, engine = _pipe(), optimize(_pipe(), "kernels")
    _image(engine)
    restore(engine)
    optimize(engine, "kernels")
    _image(engine)
    for pipe in (reference, engine):
        block = pipe.transformer.transformer_blocks[0]
        block.attn.to_k.weight.data = block.attn.to_k.weight.data * 2.0
    torch.testing.assert_close(_image(engine), _image(reference), atol=1e-5, rtol=0)


_TRACED_COMPILE = EngineConfig(compile=CompileConfig(mode="regional", backend="aot_eager"))  # nn.Module.compile


@pytest.mark.parametrize("hook", ["pab", "taylorseer-full"])
def test_a_cache_hook_on_the_attention_modules_of_compiled_blocks_is_refused_and_undone(hook):
    """Before: PyramidAttentionBroadcast or TaylorSeer's full mode enabled after optimize('compile') failed inside
    dynamo at the first call ("Data-dependent branching", "Skip inlining torch.compiler.disable()d function"). Now
    enable_cache refuses, takes the hooks off again, and the next call is diffusers' uncached image."""
    engine = optimize(_pipe(), _TRACED_COMPILE)
    config = _pab(engine) if hook == "pab" else TaylorSeerCacheConfig(cache_interval=2)
    with pytest.raises(ConfigError, match=r"transformer_blocks.0.attn carries diffusers hooks .*compiles each block"):
        engine.transformer.enable_cache(config)
    assert not engine.transformer.is_cache_enabled
    torch.testing.assert_close(_image(engine), _image(_pipe()), atol=1e-5, rtol=0)


def test_a_cache_hook_applied_to_compiled_attention_modules_directly_is_refused_at_the_call():
    from diffusers.hooks import apply_pyramid_attention_broadcast

    engine = optimize(_pipe(), _TRACED_COMPILE)
    apply_pyramid_attention_broadcast(engine.transformer, _pab(engine))
    with pytest.raises(ConfigError, match=r"attn carries diffusers hooks \['pyramid_attention_broadcast'\]"):
        _image(engine)


def test_a_block_cache_on_blocks_compiled_without_frames_is_refused_and_one_through_frames_runs(tmp_path):
    """A block-level hook (FirstBlockCache) wraps the block's forward: the engine's frames (the presets' default) run
    it around the compiled block (diffusers' cached image); nn.Module.compile (another backend, or the cache off)
    traced it and failed inside dynamo: refused now, naming the fix."""
    traced = optimize(_pipe(), _TRACED_COMPILE)
    with pytest.raises(ConfigError, match=r"forward replaced by diffusers hooks \['fbc_leader_block_hook'\].*frames"):
        traced.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    assert not traced.transformer.is_cache_enabled
    framed = optimize(_pipe(), EngineConfig(compile=CompileConfig(mode="regional"),
                                            cache=CacheConfig(directory=str(tmp_path))))  # fmt: skip
    framed.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    reference = _pipe()
    reference.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    cached = _image(reference, num_inference_steps=4)
    assert (cached - _image(_pipe(), num_inference_steps=4)).abs().max() > 1e-3  # the cache skipped blocks
    torch.testing.assert_close(_image(framed, num_inference_steps=4), cached, atol=2e-5, rtol=0)


@pytest.mark.gpu
def test_a_block_cache_under_a_cuda_graph_of_diffusers_blocks_is_refused(tmp_path):
    """compile.cuda_graphs over diffusers' own blocks: a FirstBlockCache there would be captured with the branch of
    its capture's step and replayed at every step. Refused at enable_cache, the hooks taken off again."""
    pipe = FluxPipeline(**synthetic_components("tiny", device="cuda", dtype=torch.bfloat16, seed=0))
    engine = optimize(pipe, EngineConfig(compile=CompileConfig(mode="regional", cuda_graphs=True),
                                         cache=CacheConfig(directory=str(tmp_path))))  # fmt: skip
    with pytest.raises(ConfigError, match=r"transformer_blocks.0 carries diffusers hooks .*CUDA graph"):
        engine.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    assert not engine.transformer.is_cache_enabled


_CPU = torch.device("cpu")


@pytest.mark.parametrize("switch", ["leaf", "pipeline-leaf", "layerwise"])
def test_hooks_inside_the_compiled_regions_are_refused_before_they_are_set(switch):
    """Before: diffusers' group offloading at leaf level (also through pipe.enable_group_offload) or layerwise casting
    after optimize('compile') failed inside dynamo at the first call ("Skip inlining ... ModuleGroup.onload_",
    "Attempted to use torch.nn.Parameter() constructor"). Refused now, nothing set: the next call is the image."""
    engine = optimize(_pipe(), _TRACED_COMPILE)
    expected = _image(engine)
    with pytest.raises(ConfigError, match=r"(group offloading at leaf_level|layerwise casting) hooks modules inside"):
        if switch == "leaf":
            engine.transformer.enable_group_offload(_CPU, _CPU, offload_type="leaf_level")
        elif switch == "pipeline-leaf":
            engine.enable_group_offload(onload_device=_CPU, offload_device=_CPU, offload_type="leaf_level")
        else:
            engine.transformer.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert not getattr(engine.transformer.transformer_blocks[0].attn.to_q, "_diffusers_hook", None)
    torch.testing.assert_close(_image(engine), expected, atol=0, rtol=0)


def test_leaf_group_offloading_applied_directly_is_refused_at_the_call():
    """diffusers' apply_group_offloading() called directly passes the wrapped enable_group_offload; at leaf level the
    next call failed inside dynamo ("Skip inlining ... ModuleGroup.onload_"). Refused at the call, before any block
    runs, naming the routes that work."""
    from diffusers.hooks import apply_group_offloading

    engine = optimize(_pipe(), _TRACED_COMPILE)
    apply_group_offloading(engine.transformer, onload_device=_CPU, offload_device=_CPU, offload_type="leaf_level")
    with pytest.raises(ConfigError, match=r"leaf-level group offloading \(apply_group_offloading\) on modules inside"):
        _image(engine)


@pytest.mark.parametrize("order", ["after", "before"])
def test_leaf_group_offloading_on_the_fused_blocks_compiled_is_refused(order):
    """The fused blocks' guards were taken to refuse it (they let group offloading through, which works on the fused
    blocks uncompiled): on the kernels-compile, lean-bf16, fp8-block and fbcache presets the first call failed inside
    dynamo ("Skip inlining ... ModuleGroup.onload_"). Refused at enable_group_offload now; applied before optimize(),
    at optimize(), before anything changes."""
    from engine.config import AttentionConfig

    config = EngineConfig(attention=AttentionConfig(backend="auto"),
                          compile=CompileConfig(mode="regional", backend="aot_eager"))  # fmt: skip
    from engine.attention import EngineDoubleBlock

    pipe = _pipe()
    if order == "before":  # refused at optimize(), before the blocks are fused and compiled
        pipe.transformer.enable_group_offload(_CPU, _CPU, offload_type="leaf_level")
        with pytest.raises(ConfigError, match=r"leaf-level group offloading \(apply_group_offloading\) on modules"):
            optimize(pipe, config)
        assert type(pipe.transformer.transformer_blocks[0]) is not EngineDoubleBlock
        return
    engine = optimize(pipe, config)
    expected = _image(engine)
    with pytest.raises(ConfigError, match=r"group offloading at leaf_level hooks modules inside.*Nothing was done"):
        engine.transformer.enable_group_offload(_CPU, _CPU, offload_type="leaf_level")
    torch.testing.assert_close(_image(engine), expected, atol=0, rtol=0)


def test_blocks_compiled_before_optimize_are_refused_where_the_fused_blocks_compile_or_stream():
    """Before: diffusers' compile_repeated_blocks() then optimize() with kernels-compile, lean-bf16, fp8-block,
    fp8-leaf or the fbcache preset failed inside dynamo at the first call, and at every call after it. Refused before
    anything changes; a preset that leaves the fused blocks uncompiled and resident keeps the user's compile."""
    from engine.attention import EngineDoubleBlock
    from engine.config import AttentionConfig

    fused = AttentionConfig(backend="auto")
    pipe = _pipe()
    expected = _image(pipe)
    pipe.transformer.compile_repeated_blocks(backend="eager")
    for config in (EngineConfig(attention=fused, compile=CompileConfig(mode="regional", backend="aot_eager")),
                   EngineConfig(attention=fused, offload=OffloadConfig(policy="leaf"))):  # fmt: skip
        with pytest.raises(ConfigError, match=r"transformer_blocks\.0 was compiled before optimize\(\).*Nothing"):
            optimize(pipe, config)
        assert type(pipe.transformer.transformer_blocks[0]) is not EngineDoubleBlock
    optimize(pipe, EngineConfig(attention=fused))
    torch.testing.assert_close(_image(pipe), expected, atol=1e-5, rtol=0)  # fused QKV sums: fp32 rounding


def test_group_offloading_at_block_level_runs_around_blocks_compiled_through_frames(tmp_path):
    """Block-level group offloading hooks the blocks whole, which the engine's frames run around: diffusers' image;
    with nn.Module.compile (the compile cache off, another backend) it is refused, as it failed inside dynamo."""
    traced = optimize(_pipe(), _TRACED_COMPILE)
    with pytest.raises(ConfigError, match=r"group offloading at block_level hooks modules inside"):
        traced.transformer.enable_group_offload(_CPU, _CPU, offload_type="block_level", num_blocks_per_group=1)
    framed = optimize(_pipe(), EngineConfig(compile=CompileConfig(mode="regional"),
                                            cache=CacheConfig(directory=str(tmp_path))))  # fmt: skip
    framed.transformer.enable_group_offload(_CPU, _CPU, offload_type="block_level", num_blocks_per_group=1)
    torch.testing.assert_close(_image(framed), _image(_pipe()), atol=2e-5, rtol=0)


@pytest.mark.parametrize("switch", ["enable_cache", "disable_cache"])
def test_diffusers_cache_switches_beside_the_engine_step_cache_are_refused(switch):
    """A config with the engine's step cache on diffusers' own blocks: before, enable_cache stacked diffusers' hook on
    the engine's (0.022 from diffusers with that hook alone) and disable_cache logged "nothing to disable" while the
    engine's cache ran on (0.022 from plain diffusers), both without a word. Refused, nothing changed; restore()
    gives diffusers' switches back."""
    from engine import restore
    from engine.config import StepCacheConfig

    pipe = optimize(_pipe(), EngineConfig(step_cache=StepCacheConfig("taylorseer", interval=2)))
    before = _image(pipe, num_inference_steps=6)
    args = (TaylorSeerCacheConfig(cache_interval=2),) if switch == "enable_cache" else ()
    with pytest.raises(ConfigError, match=rf"{switch}\(.*\) after optimize\(\): .*step cache \(taylorseer:2\)"):
        getattr(pipe.transformer, switch)(*args)
    assert torch.equal(_image(pipe, num_inference_steps=6), before)
    restore(pipe)
    pipe.transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=2))  # diffusers' own again
    pipe.transformer.disable_cache()


def test_a_step_cache_over_diffusers_cache_is_refused_before_any_step():
    """diffusers' FirstBlockCache on, then optimize() with the engine's step cache on diffusers' blocks: both ran
    stacked, and the way out (disable_cache) was then refused. Refused at optimize(), nothing changed."""
    from engine.config import StepCacheConfig

    pipe = _pipe()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    config = EngineConfig(step_cache=StepCacheConfig("taylorseer", interval=2))
    with pytest.raises(ConfigError, match=r"cache on \(FirstBlockCacheConfig\).*step cache \(taylorseer:2\)"):
        optimize(pipe, config)
    assert getattr(pipe, "engine_steps", None) is None
    pipe.transformer.disable_cache()
    optimize(pipe, config)
