"""LoRA adapters through diffusers' own Flux LoRA API (PEFT layers) on the engine's fused blocks (engine/lora.py),
against plain diffusers with the same adapters and the same calls, on the tiny model in fp32 on the CPU.

The adapters are synthetic: diffusers/PEFT-format state dicts (`transformer.<module>.lora_A.weight` / `lora_B`) with
random low-rank factors on every attention and MLP projection of every block, the fused ones included.
"""

from __future__ import annotations

import pytest
import torch
from conftest import swap_without_recompiling, tiny_call_kwargs, trainer_format_lora
from diffusers import FluxPipeline

from engine import EngineConfig, FluxEngine, restore
from engine.config import AttentionConfig, CompileConfig, OffloadConfig
from engine.errors import CheckpointError, ConfigError, InputError
from engine.lora import synthetic_lora
from engine.models import synthetic_components

# the fused blocks in plain PyTorch (no Triton on the CPU): diffusers' maths with fused QKV GEMMs
FUSED = EngineConfig(attention=AttentionConfig(backend="auto"))
# and compiled regions (eager backend: no inductor on the CPU)
COMPILED = EngineConfig(attention=AttentionConfig(backend="auto"), compile=CompileConfig("regional", backend="eager"))
# fp32, and the same GEMMs split differently (one fused GEMM against three): the engine against diffusers measured
# within 1e-6 after every call; a pipeline with its adapters disabled against one that never had any, 1.1e-6. The
# unfixed engine (adapters on the fused projections ignored) is 0.042 away
ATOL = 1e-5


def lora_state_dict(transformer, rank: int = 4, seed: int = 1) -> dict:
    return synthetic_lora(transformer, rank, seed, std=0.1)


def _pipes(config=FUSED, device="cpu"):
    reference = FluxPipeline(**synthetic_components("tiny", device=device, dtype=torch.float32, seed=0))
    engine = FluxEngine.from_pipe(
        FluxPipeline(**synthetic_components("tiny", device=device, dtype=torch.float32, seed=0)), config
    )
    return reference, engine


def _image(pipe, **overrides) -> torch.Tensor:
    return pipe(**tiny_call_kwargs(**overrides)).images.float()


def _same(reference, engine, atol: float = ATOL, **overrides) -> torch.Tensor:
    expected = _image(reference, **overrides)
    torch.testing.assert_close(_image(engine, **overrides), expected, atol=atol, rtol=0)
    return expected


@pytest.fixture(scope="module")
def adapters():
    transformer = synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)["transformer"]
    return lora_state_dict(transformer, seed=1), lora_state_dict(transformer, rank=8, seed=2)


def test_every_lora_call_gives_diffusers_images_on_the_fused_blocks(adapters):
    """The same sequence of LoRA calls on both pipelines; after each, the same image."""
    _every_call(*_pipes(), adapters)


@pytest.mark.parametrize("policy", ["block", "leaf"])
def test_every_lora_call_on_streamed_blocks_gives_diffusers_images(adapters, policy):
    """Offload block / leaf: the blocks stream from host memory, the adapters' factors stay beside them on the
    device, merges write into the host copy that streams (on the CPU both are host memory: the GPU twin below)."""
    config = EngineConfig(attention=AttentionConfig(backend="auto"), offload=OffloadConfig(policy))
    _every_call(*_pipes(config), adapters)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="streaming to a GPU needs CUDA")
@pytest.mark.parametrize("policy", ["block", "leaf"])
def test_every_lora_call_on_streamed_blocks_on_the_gpu(adapters, policy):
    # against the same engine with resident blocks: on the GPU the fused GEMMs round apart from diffusers' split
    # ones by up to 2.3e-5 (measured on an H200, fp32, no adapter), over the CPU's 1e-5; with the same GEMMs only
    # the merges differ (on the host here, on the GPU there)
    config = EngineConfig(attention=AttentionConfig(backend="auto"), offload=OffloadConfig(policy))
    _, resident = _pipes(device="cuda")
    _, engine = _pipes(config, device="cuda")
    # after a merge: the streamed engine computes B @ A on the host, the resident one on the GPU: 3.6e-5 apart
    # (measured on an H200), and the unmerge subtracts a host-rounded delta again
    _every_call(resident, engine, adapters, merged_atol=1e-4)
    engine.load_lora_weights(dict(adapters[0]), adapter_name="again")
    factors = [p for n, p in engine.transformer.named_parameters() if "lora_" in n]
    assert factors and all(p.is_cuda for p in factors)  # resident beside the streamed blocks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's CUDA kernels and CUDA graphs need CUDA")
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_new_adapter_scales_on_compiled_blocks_on_the_gpu(adapters, cuda_graphs):
    """test_new_adapter_scales_on_compiled_blocks_recompile_nothing with inductor's CUDA kernels (and the whole forward
    captured): the scales are float64 device tensors, inputs of the compiled regions and of the captured graph.
    Against the same fused engine uncompiled, fp32, both with the same fused GEMMs. gpu_atol: inductor's fused fp32
    kernels against eager CUDA ops, measured on an H200 (2026-11-30, with and without graphs): 2.0e-5 at the first
    call, 1.46e-4 (2 of 12288 values) after scale 0 then 0.5; 1e-3 leaves ~7x room. A stale scale or weight would
    still fail it: each change in this sequence moves the image by 0.023-0.145 (max) and 0.002-0.011 (mean) on the
    CPU, so each is asserted to move it by more than 1e-2."""
    gpu_atol = 1e-3
    first, second = adapters
    compiled = CompileConfig("regional", cuda_graphs=cuda_graphs)
    _, reference = _pipes(device="cuda")
    _, engine = _pipes(EngineConfig(attention=AttentionConfig(backend="auto"), compile=compiled), device="cuda")
    for pipe in (reference, engine):
        pipe.load_lora_weights(dict(first), adapter_name="first")
        pipe.load_lora_weights(dict(second), adapter_name="second")
        pipe.set_adapters(["first", "second"], [1.0, 1.0])
    _same(reference, engine, gpu_atol)
    before = _same(reference, engine, gpu_atol)  # with cuda_graphs: this call captures
    with torch._dynamo.config.patch(error_on_recompile=True):
        for weights in ([0.5, 1.0], [1.3, -0.2]):
            for pipe in (reference, engine):
                pipe.set_adapters(["first", "second"], weights)
            image = _same(reference, engine, gpu_atol)
            assert (image - before).abs().max() > 1e-2  # the new weights do change the image
            before = _same(reference, engine, gpu_atol)
        for scale in (0.7, 0.0, 0.5):
            image = _same(reference, engine, gpu_atol, joint_attention_kwargs={"scale": scale})
            assert (image - before).abs().max() > 1e-2
            before = image


def _every_call(reference, engine, adapters, merged_atol: float = ATOL) -> None:
    first, second = adapters
    plain = _same(reference, engine)
    for pipe in (reference, engine):
        pipe.load_lora_weights(dict(first), adapter_name="first")
    with_first = _same(reference, engine)
    assert (with_first - plain).abs().max() > 1e-3  # the adapter does change the image
    _same(reference, engine, joint_attention_kwargs={"scale": 0.5})
    for pipe in (reference, engine):
        pipe.load_lora_weights(dict(second), adapter_name="second")
        pipe.set_adapters(["first", "second"], adapter_weights=[0.7, 1.3])
    _same(reference, engine)
    for pipe in (reference, engine):
        pipe.disable_lora()
    torch.testing.assert_close(_same(reference, engine), plain, atol=ATOL, rtol=0)
    for pipe in (reference, engine):
        pipe.enable_lora()
        pipe.fuse_lora(lora_scale=0.8)
    _same(reference, engine, atol=merged_atol)
    for pipe in (reference, engine):
        pipe.unfuse_lora()
        pipe.delete_adapters("first")
    _same(reference, engine, atol=merged_atol)
    for pipe in (reference, engine):
        pipe.unload_lora_weights()
    torch.testing.assert_close(_same(reference, engine, atol=merged_atol), plain, atol=merged_atol, rtol=0)


def test_safe_fusing_reaches_the_fused_weight(adapters):
    """fuse_lora(safe_fusing=True) gives the projection a new weight tensor instead of writing into the view of the
    fused weight; the engine copies it back (engine.lora.resync_fused_views), so the fused GEMM sees the merge."""
    first, _ = adapters
    reference, engine = _pipes()
    for pipe in (reference, engine):
        pipe.load_lora_weights(dict(first), adapter_name="first")
        pipe.fuse_lora(safe_fusing=True)
    _same(reference, engine)
    block = engine.transformer.transformer_blocks[0]
    to_k = block.attn.to_k.base_layer if hasattr(block.attn.to_k, "base_layer") else block.attn.to_k
    assert to_k.weight.data_ptr() == block.qkv.weight[block.attn.to_q.out_features :].data_ptr()


def test_lora_after_a_compiled_call(adapters):
    """Regional compile (aot_eager on the CPU), a call, then an adapter: the compiled blocks see it."""
    first, _ = adapters
    config = EngineConfig(attention=AttentionConfig(backend="auto"), compile=CompileConfig("regional", backend="eager"))
    reference, engine = _pipes(config)
    _same(reference, engine)
    for pipe in (reference, engine):
        pipe.load_lora_weights(dict(first), adapter_name="first")
    _same(reference, engine)


def test_restore_with_an_adapter_loaded(adapters):
    first, _ = adapters
    reference, engine = _pipes()
    for pipe in (reference, engine):
        pipe.load_lora_weights(dict(first), adapter_name="first")
    restore(engine)
    assert "load_lora_weights" not in vars(engine)  # diffusers' own method again
    # and the transformer's own, with none of the engine's notes left on it
    assert not [name for name in vars(engine.transformer) if name.startswith("_engine_lora") or name == "fuse_lora"]
    assert not engine.transformer._forward_pre_hooks
    _same(reference, engine)


def test_lora_from_a_local_safetensors_file(adapters, tmp_path):
    from safetensors.torch import save_file

    first, _ = adapters
    path = tmp_path / "adapter.safetensors"
    save_file(dict(first), str(path))
    reference, engine = _pipes()
    reference.load_lora_weights(dict(first), adapter_name="first")
    engine.load_lora_weights(str(path), adapter_name="first")
    _same(reference, engine)


def _left_as_it_was(engine, before: torch.Tensor) -> None:
    assert not any("lora" in name for name, _ in engine.transformer.named_modules())
    torch.testing.assert_close(_image(engine), before, atol=0, rtol=0)


def test_missing_and_corrupt_files_are_refused_without_a_download(tmp_path):
    _, engine = _pipes()
    before = _image(engine)
    # a name diffusers would take for a hub repository: refused as a missing local file, nothing fetched
    for missing in (tmp_path / "nope.safetensors", "someone/some-flux-lora"):
        with pytest.raises(CheckpointError, match="does not exist.*nothing is downloaded"):
            engine.load_lora_weights(str(missing), adapter_name="x")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="could not be read.*complete .safetensors"):
        engine.load_lora_weights(str(corrupt), adapter_name="x")
    _left_as_it_was(engine, before)


def test_a_lora_for_another_architecture_is_refused_and_nothing_stays(adapters):
    _, engine = _pipes()
    before = _image(engine)
    wide = 3072  # FLUX.1-dev's width; the tiny model's is 128
    state = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, wide),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(wide, 4),
    }
    with pytest.raises(InputError, match="does not fit this transformer.*another model"):
        engine.load_lora_weights(state, adapter_name="wide")
    assert engine.get_list_adapters() == {}
    _left_as_it_was(engine, before)


def test_dora_on_fused_projections_is_refused_at_the_load_and_nothing_stays(adapters):
    """DoRA (a magnitude vector beside the factors) on projections the engine fuses: loaded without a word, then
    refused at every call. Refused at the load now; DoRA on projections the engine leaves alone still loads."""
    _, engine = _pipes()
    before = _image(engine)
    first = adapters[0]
    dora = dict(first)
    for key in [k for k in first if k.endswith("lora_B.weight")]:
        dora[key.replace("lora_B.weight", "lora_magnitude_vector")] = torch.rand(first[key].shape[0]) + 0.5
    with pytest.raises(ConfigError, match="'dora' is a LoRA variant .*on a projection the engine fuses.*Nothing was"):
        engine.load_lora_weights(dora, adapter_name="dora")
    assert engine.get_list_adapters() == {}
    _left_as_it_was(engine, before)
    unfused = {key: value for key, value in dora.items() if ".ff." in key}  # the MLPs: not fused
    reference, engine = _pipes()
    for pipe in (reference, engine):
        pipe.load_lora_weights(dict(unfused), adapter_name="dora")
    _same(reference, engine)


def test_hotswap_into_compiled_blocks_recompiles_nothing(adapters):
    """enable_lora_hotswap, an adapter, a compiled call, then another adapter swapped in (hotswap=True): diffusers'
    image with the second adapter loaded directly, and no graph compiled again."""
    first, second = adapters  # ranks 4 and 8
    reference, engine = _pipes(COMPILED)
    swapped = swap_without_recompiling(engine, first, second, _image)
    reference.load_lora_weights(dict(second), adapter_name="style")
    torch.testing.assert_close(swapped, _image(reference), atol=ATOL, rtol=0)


def test_new_adapter_scales_on_compiled_blocks_recompile_nothing(adapters):
    """Dynamo reads the floats of the compiled blocks as constants (engine.compile.dynamo_settings), so the adapters'
    scales are tensors under compile: new set_adapters weights and joint_attention_kwargs scales give diffusers'
    images without compiling anything again (with float scales, the first new weight recompiles the blocks)."""
    reference, engine = _pipes(COMPILED)
    _new_scales_recompile_nothing(reference, engine, adapters)


def _new_scales_recompile_nothing(reference, engine, adapters) -> None:
    first, second = adapters
    for pipe in (reference, engine):
        pipe.load_lora_weights(dict(first), adapter_name="first")
        pipe.load_lora_weights(dict(second), adapter_name="second")
        pipe.set_adapters(["first", "second"], [1.0, 1.0])  # which adapters act is structure: it may recompile
    _same(reference, engine)  # compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        for weights in ([0.5, 1.0], [1.3, -0.2]):
            for pipe in (reference, engine):
                pipe.set_adapters(["first", "second"], weights)
            _same(reference, engine)
        # 0: diffusers resets the scales afterwards with PEFT's set_scale, which writes floats
        for scale in (0.7, 0.25, 0.0, 0.5):
            _same(reference, engine, joint_attention_kwargs={"scale": scale})
    scales = [value for module in engine.transformer.modules() for value in getattr(module, "scaling", {}).values()]
    assert scales and all(isinstance(value, torch.Tensor) and value.dtype == torch.float64 for value in scales)


def test_hotswap_above_the_target_rank_is_refused(adapters, tmp_path):
    """diffusers swaps a rank-16 adapter into a target of 8 without a word and makes another image (measured 0.115
    from loading it directly); the engine refuses it, from a state dict or a file, and keeps the adapter it had."""
    from safetensors.torch import save_file

    first, _ = adapters
    transformer = synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)["transformer"]
    large = lora_state_dict(transformer, rank=16, seed=3)
    save_file(dict(large), str(tmp_path / "large.safetensors"))
    _, engine = _pipes()
    engine.enable_lora_hotswap(target_rank=8)
    engine.load_lora_weights(dict(first), adapter_name="style")
    before = _image(engine)
    for source in (dict(large), str(tmp_path / "large.safetensors")):
        with pytest.raises(InputError, match="rank 16 is above the hot-swap target rank 8.*target_rank=16"):
            engine.load_lora_weights(source, adapter_name="style", hotswap=True)
    torch.testing.assert_close(_image(engine), before, atol=0, rtol=0)


def test_a_pipeline_over_optimised_components_gets_the_same_lora_care(adapters):
    """FluxEngine.from_pipe of an optimised pipeline shares its fused blocks: its own LoRA calls are wrapped too."""
    first, _ = adapters
    reference, engine = _pipes()
    second_engine = FluxEngine.from_pipe(engine, FUSED)
    assert "load_lora_weights" in vars(second_engine)
    for pipe in (reference, second_engine):
        pipe.load_lora_weights(dict(first), adapter_name="first")
    _same(reference, second_engine)


def _plain_over(engine, how: str) -> FluxPipeline:
    """A diffusers pipeline the engine never saw, over the optimised pipeline's transformer."""
    return FluxPipeline(**engine.components) if how == "components" else FluxPipeline.from_pipe(engine)


@pytest.mark.parametrize("how", ["components", "from_pipe"])
def test_a_plain_pipeline_over_the_fused_transformer_gives_diffusers_images(adapters, how):
    """A diffusers pipeline over the optimised transformer, never optimised itself, calls the transformer's own LoRA
    methods: they get the engine's care there. Before, its fuse_lora(safe_fusing=True) gave the projections new
    weights the fused GEMM never read: both pipelines over the transformer then made images 0.022 away from diffusers,
    without a word."""
    first, _ = adapters
    reference, engine = _pipes()
    plain = _plain_over(engine, how)
    _every_call(reference, plain, adapters)
    for pipe in (reference, plain):
        pipe.load_lora_weights(dict(first), adapter_name="first")
        pipe.fuse_lora(safe_fusing=True)
    _same(reference, plain)
    _same(reference, engine)  # the same transformer, seen through the engine's pipeline


def test_a_plain_pipeline_over_compiled_blocks_recompiles_nothing_for_new_scales(adapters):
    """The compiled blocks' scales are tensors after a plain pipeline's LoRA calls too (they were floats, and the
    first new set_adapters weight recompiled the blocks)."""
    reference, engine = _pipes(COMPILED)
    _new_scales_recompile_nothing(reference, _plain_over(engine, "components"), adapters)


def test_a_plain_pipelines_hotswap_above_the_target_rank_is_refused(adapters):
    """enable_lora_hotswap and the hot-swap through a plain pipeline over the optimised transformer: the rank check
    holds there too (diffusers swaps the rank-16 adapter in without a word)."""
    first, _ = adapters
    _, engine = _pipes()
    plain = _plain_over(engine, "components")
    large = lora_state_dict(plain.transformer, rank=16, seed=3)
    plain.enable_lora_hotswap(target_rank=8)
    plain.load_lora_weights(dict(first), adapter_name="style")
    before = _image(plain)
    with pytest.raises(InputError, match="rank 16 is above the hot-swap target rank 8.*target_rank=16"):
        plain.load_lora_weights(dict(large), adapter_name="style", hotswap=True)
    torch.testing.assert_close(_image(plain), before, atol=0, rtol=0)


def test_a_plain_pipelines_dora_on_fused_projections_is_refused_and_nothing_stays(adapters):
    _, engine = _pipes()
    plain = _plain_over(engine, "components")
    before = _image(plain)
    dora = dict(adapters[0])
    for key in [k for k in adapters[0] if k.endswith("lora_B.weight")]:
        dora[key.replace("lora_B.weight", "lora_magnitude_vector")] = torch.rand(dora[key].shape[0]) + 0.5
    with pytest.raises(ConfigError, match="'dora' is a LoRA variant .*on a projection the engine fuses.*Nothing was"):
        plain.load_lora_weights(dora, adapter_name="dora")
    assert plain.get_list_adapters() == {}
    _left_as_it_was(plain, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_a_plain_pipeline_over_captured_graphs_on_the_gpu(adapters):
    """The engine's captured CUDA graph of the whole forward bakes the adapters in; a plain pipeline's LoRA calls over
    the same transformer drop it too (before, its replay kept making the image without the adapter). Against the
    same fused engine uncompiled, fp32; gpu_atol as in test_new_adapter_scales_on_compiled_blocks_on_the_gpu."""
    gpu_atol = 1e-3
    first, second = adapters
    graphs = CompileConfig("regional", cuda_graphs=True)
    _, reference = _pipes(device="cuda")
    _, engine = _pipes(EngineConfig(attention=AttentionConfig(backend="auto"), compile=graphs), device="cuda")
    plain = _plain_over(engine, "components")
    plain_image = _same(reference, plain, gpu_atol)
    _same(reference, plain, gpu_atol)  # captures
    for pipe in (reference, plain):
        pipe.load_lora_weights(dict(first), adapter_name="first")
    image = _same(reference, plain, gpu_atol)
    assert (image - plain_image).abs().max() > 1e-2  # the adapter does change the image
    _same(reference, plain, gpu_atol)  # captures again
    for pipe in (reference, plain):
        pipe.load_lora_weights(dict(second), adapter_name="second")
        pipe.set_adapters(["first", "second"], [0.5, 1.0])
    _same(reference, plain, gpu_atol)
    _same(reference, engine, gpu_atol)


def test_a_synthetic_lora_changes_each_projection_by_its_strength():
    """By default B @ A's RMS is 10% of each projection's weight's (a trained adapter's order), whatever the width."""
    transformer = synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)["transformer"]
    state = synthetic_lora(transformer, rank=16, seed=0)
    for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out"):
        delta = state[f"transformer.{name}.lora_B.weight"] @ state[f"transformer.{name}.lora_A.weight"]
        weight = transformer.get_submodule(name).weight
        ratio = (delta.pow(2).mean().sqrt() / weight.pow(2).mean().sqrt()).item()
        assert 0.07 < ratio < 0.13, (name, ratio)  # random factors: within 30% of 0.1


@pytest.mark.parametrize("layout", ["kohya", "xlabs"])
def test_trainer_format_loras_give_diffusers_images(layout):
    """LoRAs in kohya's and XLabs' layouts, converted by diffusers on loading (fused QKV factors split, a down factor
    shared by q, k and v, alphas folded in, the adaLN modulation linears): the engine's image is diffusers'."""
    reference, engine = _pipes()
    plain = _image(reference)
    state = trainer_format_lora(reference.transformer, layout)
    for pipe in (reference, engine):
        pipe.load_lora_weights(dict(state), adapter_name=layout)
    assert (_same(reference, engine) - plain).abs().max() > 1e-3


def _control_lora(seed: int = 5) -> dict:
    """A Flux Control LoRA (Canny / Depth LoRA): block adapters and x_embedder's A widened to 128 inputs."""
    state = synthetic_lora(synthetic_components("tiny", device="cpu", dtype=torch.float32)["transformer"], 4,
                           seed=seed, std=0.1)  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    state["transformer.x_embedder.lora_A.weight"] = torch.randn(4, 128, generator=generator) * 0.1
    state["transformer.x_embedder.lora_B.weight"] = torch.randn(128, 4, generator=generator) * 0.1
    return state


def test_a_control_lora_names_the_route_that_works():
    """Before: optimize(FluxControlPipeline) refused the 64-channel transformer ("load it into FluxPipeline"), and
    the LoRA loaded first was refused ("call optimize() first"): each sent the user to the other. Both now name the
    route, and the route gives diffusers' image with the Control LoRA."""
    from diffusers import FluxControlPipeline
    from PIL import Image

    from engine import optimize

    control = {"control_image": Image.new("RGB", (64, 64), (90, 160, 40))}
    reference = FluxControlPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32))
    reference.load_lora_weights(_control_lora())
    with pytest.raises(ConfigError, match=r"Control LoRA .*load the LoRA on it, then FluxControlPipeline.from_pipe"):
        optimize(FluxControlPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32)), FUSED)
    loaded = FluxControlPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32))
    loaded.load_lora_weights(_control_lora())
    with pytest.raises(ConfigError, match=r"before optimize.*Control LoRA .*128 inputs.*from_pipe"):
        optimize(loaded, FUSED)
    from diffusers import FluxFillPipeline

    with pytest.raises(ConfigError, match=r"feeds its transformer 384") as refused:  # no LoRA widens to Fill's 384
        optimize(FluxFillPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32)), FUSED)
    assert "Control LoRA" not in str(refused.value)
    base = optimize(FluxPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32)), FUSED)
    base.load_lora_weights(_control_lora())
    engine = FluxControlPipeline.from_pipe(base)
    torch.testing.assert_close(_image(engine, **control), _image(reference, **control), atol=ATOL, rtol=0)
