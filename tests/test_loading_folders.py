"""Local folders as real FLUX.1 downloads lay them out, loaded as diffusers and transformers load them: a folder
whose name is also a synthetic variant's, CLIP keys with transformers 4's `text_model.` prefix, a T5 folder with
both a single file and a shard index, a broken shard index, and the bench's baseline over a quantised folder."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import FluxEngine
from engine.config import QuantConfig
from engine.errors import CheckpointError, ConfigError
from engine.models import load_local_components, synthetic_components


def _state(module: torch.nn.Module) -> dict:
    return {key: value.clone() for key, value in module.state_dict().items()}


def _equal_states(got: dict, expected: dict) -> bool:
    return got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


@pytest.fixture(scope="module")
def saved_seed1(tmp_path_factory):
    """The tiny pipeline with seed-1 weights, saved as a diffusers folder named `tiny` (a synthetic variant's name)."""
    from diffusers import FluxPipeline

    folder = tmp_path_factory.mktemp("names") / "tiny"
    FluxPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=1)).save_pretrained(folder)
    return folder


def test_a_folder_named_like_a_variant_loads_the_folder_not_a_random_model(saved_seed1, monkeypatch):
    """Before: "tiny" (or a folder named flux-dev) was taken as the synthetic variant, so the user's folder was
    silently replaced by random seed-0 weights. Only `synthetic:<variant>` names a random model now."""
    monkeypatch.chdir(saved_seed1.parent)
    expected = _state(load_local_components(saved_seed1, "cpu", torch.float32)["transformer"])
    random_seed0 = _state(synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)["transformer"])
    assert not _equal_states(expected, random_seed0)

    engine = FluxEngine.from_pretrained("tiny", config="baseline", device="cpu", dtype=torch.float32)
    assert _equal_states(_state(engine.transformer), expected)
    assert engine.model_name == "tiny"
    synthetic = FluxEngine.from_pretrained("synthetic:tiny", config="baseline", device="cpu", dtype=torch.float32)
    assert _equal_states(_state(synthetic.transformer), random_seed0)


def test_a_bare_variant_name_with_no_such_folder_names_the_synthetic_spelling(tmp_path, monkeypatch):
    from engine import cli
    from engine.bench import cli as bench_cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"'flux-dev' does not exist.*pass 'synthetic:flux-dev'"):
        FluxEngine.from_pretrained("flux-dev", device="cpu")
    args = bench_cli.build_parser().parse_args(["--model", "tiny", "--device", "cpu"])
    with pytest.raises(CheckpointError, match=r"--model 'tiny' does not exist.*pass 'synthetic:tiny'"):
        cli.choose_model(args, ["64"])
    args = bench_cli.build_parser().parse_args(["--model", "synthetic:tiny", "--device", "cpu"])
    assert cli.choose_model(args, ["64"]).model == "synthetic:tiny"


def _prefix_clip_keys(folder):
    """FLUX.1-dev's text_encoder/model.safetensors as published (transformers 4 wrote `text_model.`-prefixed keys;
    transformers 5 strips the prefix while loading)."""
    path = folder / "text_encoder" / "model.safetensors"
    state = load_file(str(path))
    assert not any(key.startswith("text_model.") for key in state)
    save_file({f"text_model.{key}": value for key, value in state.items()}, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("mode", ["fp8", "int8-weight"])
def test_quantising_a_clip_folder_with_the_published_key_prefix(saved_seed1, tmp_path, mode):
    """Before: the streamed load looked the model's names up as they are and refused the folder ("lacks 21 tensors
    of its model"), where transformers' from_pretrained loads it."""
    from diffusers import FluxPipeline

    from engine.quant import apply_quantization

    folder = tmp_path / "published"
    shutil.copytree(saved_seed1, folder)
    _prefix_clip_keys(folder)
    quant = QuantConfig(text_encoder=mode)
    streamed = load_local_components(folder, "cpu", torch.float32, quant=quant)["text_encoder"]
    reference = FluxPipeline(**load_local_components(folder, "cpu", torch.float32))
    unprefixed = load_local_components(saved_seed1, "cpu", torch.float32)["text_encoder"]
    assert _equal_states(_state(reference.text_encoder), _state(unprefixed))  # transformers strips the prefix
    apply_quantization(reference, quant)
    assert _equal_states(_state(streamed), _state(reference.text_encoder))


def test_a_t5_folder_with_a_single_file_and_a_shard_index_loads_what_transformers_loads(saved_seed1, tmp_path):
    """transformers reads model.safetensors before model.safetensors.index.json; the quantised load read the shards
    first, so a folder holding both (an old download beside a new one) gave other weights than the plain load."""
    from diffusers import FluxPipeline

    from engine.quant import apply_quantization

    folder = tmp_path / "both"
    shutil.copytree(saved_seed1, folder)
    t5 = folder / "text_encoder_2"
    other = {key: torch.randn_like(value) for key, value in load_file(str(t5 / "model.safetensors")).items()}
    save_file(other, str(t5 / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": dict.fromkeys(other, "model-00001-of-00001.safetensors")}
    (t5 / "model.safetensors.index.json").write_text(json.dumps(index))

    quant = QuantConfig(text_encoder_2="fp8")
    streamed = load_local_components(folder, "cpu", torch.float32, quant=quant)["text_encoder_2"]
    reference = FluxPipeline(**load_local_components(folder, "cpu", torch.float32))
    apply_quantization(reference, quant)
    assert _equal_states(_state(streamed), _state(reference.text_encoder_2))


def test_a_broken_shard_index_is_a_clear_error(saved_seed1, tmp_path):
    from diffusers import FluxPipeline

    folder = tmp_path / "sharded"
    FluxPipeline(**load_local_components(saved_seed1, "cpu", torch.float32)).save_pretrained(
        folder, max_shard_size="50KB"
    )
    (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text("{truncated")
    with pytest.raises(CheckpointError, match=r"index\.json' is not a readable shard index .*copy it again"):
        load_local_components(folder, "cpu", torch.float32, quant=QuantConfig(transformer="fp8"))


def test_the_bench_refuses_a_diffusers_baseline_over_a_quantised_folder(saved_seed1, tmp_path, capsys):
    """Before: `engine.bench --model <save_quantized folder>` timed its "diffusers" baseline on the engine's fp8
    transformer and reported that as diffusers."""
    from engine.bench import cli as bench_cli
    from engine.quant import save_quantized

    engine = FluxEngine.from_pretrained(saved_seed1, config="fp8", device="cpu", dtype=torch.float32)
    folder = save_quantized(engine, tmp_path / "flux-fp8")
    argv = ["--model", str(folder), "--device", "cpu", "--res", "64", "--allow-any-size", "--steps", "1"]
    argv += ["--preset", "fp8"]
    assert bench_cli.main([*argv, "--out", str(tmp_path / "r.json")]) == 2
    assert "saved quantised as 'fp8'" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("quantised", [False, True])
def test_single_files_in_bfl_or_diffusers_names_and_the_sft_suffix(saved_seed1, tmp_path, quantised):
    """Before: a `.sft` file (ComfyUI's mirrors of BFL's releases) was taken for a folder ("no model_index.json"),
    and a transformer saved alone in diffusers' names was refused for lacking BFL's keys."""
    from diffusers import FluxPipeline

    from engine.models import save_bfl_single_file
    from engine.quant import apply_quantization

    expected = load_local_components(saved_seed1, "cpu", torch.float32)
    bfl = save_bfl_single_file(expected["transformer"], tmp_path / "flux1-tiny.sft")
    quant = QuantConfig(transformer="fp8") if quantised else None
    if quantised:  # what quantising while loading must equal
        apply_quantization(FluxPipeline(**expected), quant)
    diffusers_file = tmp_path / "transformer-alone.safetensors"
    shutil.copy(saved_seed1 / "transformer" / "diffusion_pytorch_model.safetensors", diffusers_file)
    for path in (bfl, diffusers_file):
        loaded = load_local_components(path, "cpu", torch.float32, config_folder=saved_seed1, quant=quant)
        assert _equal_states(_state(loaded["transformer"]), _state(expected["transformer"])), path.name


def test_a_tokenizer_folder_without_its_vocabulary_is_a_clear_error(saved_seed1, tmp_path):
    """Before: transformers loaded it as a tokenizer of a few special tokens, and every prompt encoded to nothing."""
    folder = tmp_path / "incomplete"
    shutil.copytree(saved_seed1, folder)
    (folder / "tokenizer_2" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer_2' holds no vocabulary .*tokenizer_config.json.*copy"):
        load_local_components(folder, "cpu", torch.float32)


def test_a_folder_of_variant_weights_loads_with_variant_as_in_diffusers(saved_seed1, tmp_path):
    """Before: `variant=` was a TypeError, and the folder without it failed with a hint about truncated files."""
    from diffusers import FluxPipeline

    from engine.quant import apply_quantization

    plain = load_local_components(saved_seed1, "cpu", torch.float32)
    folder = tmp_path / "fp16-variant"
    FluxPipeline(**plain).save_pretrained(folder, variant="fp16")
    assert (folder / "text_encoder_2" / "model.fp16.safetensors").is_file()
    with pytest.raises(CheckpointError, match=r"pass variant='fp16'"):
        FluxEngine.from_pretrained(folder, device="cpu", dtype=torch.float32)
    engine = FluxEngine.from_pretrained(folder, config="baseline", device="cpu", dtype=torch.float32, variant="fp16")
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        assert _equal_states(_state(getattr(engine, name)), _state(plain[name])), name
    quant = QuantConfig(transformer="fp8", text_encoder_2="fp8")
    streamed = load_local_components(folder, "cpu", torch.float32, quant=quant, variant="fp16")
    apply_quantization(FluxPipeline(**plain), quant)
    for name in ("transformer", "text_encoder_2"):
        assert _equal_states(_state(streamed[name]), _state(plain[name])), name


@pytest.mark.parametrize("mode", ["fp8", "fp8-weight", "int8-weight"])
def test_load_state_dict_on_a_quantised_transformer(mode):
    """Before: a float state dict (a fine-tune's weights, in diffusers' keys) loaded into a transformer the engine
    quantised either failed with torch's key list (fp8, strict), kept the old weights without a word (fp8,
    strict=False), or was taken by quanto's layers without quantising (fp8-weight, int8-weight, even strict): images
    far from those of the same mode over the new weights. Now refused before anything is copied; the model's own
    (quantised) state dict still loads back."""
    from conftest import tiny_call_kwargs
    from diffusers import FluxPipeline

    from engine import optimize
    from engine.config import EngineConfig

    config = EngineConfig(quant=QuantConfig(transformer=mode))
    pipe = optimize(FluxPipeline(**synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)), config)
    before = pipe(**tiny_call_kwargs()).images
    fine_tuned = synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=1)["transformer"].state_dict()
    for strict in (True, False):
        with pytest.raises(ConfigError, match=rf"quantised as '{mode}' .*Nothing was loaded.*before optimize\(\)"):
            pipe.transformer.load_state_dict(fine_tuned, strict=strict)
        assert torch.equal(pipe(**tiny_call_kwargs()).images, before)
    assert not pipe.transformer.load_state_dict(pipe.transformer.state_dict()).missing_keys
    assert torch.equal(pipe(**tiny_call_kwargs()).images, before)


def test_a_variant_the_folder_lacks_is_named_with_the_ones_it_has(saved_seed1):
    """Review fix: the hint said "pass variant='fp16'" whatever was asked and whatever the folder held."""
    with pytest.raises(CheckpointError, match=r"no weights of variant 'bf16' \(its files carry no variant\)"):
        FluxEngine.from_pretrained(saved_seed1, device="cpu", dtype=torch.float32, variant="bf16")


def test_a_folder_saved_quantised_by_diffusers_is_named_so_under_an_engine_quant_config(saved_seed1, tmp_path):
    """Before: QuantConfig(transformer='fp8') on a folder whose transformer diffusers saved quantised (quanto int8)
    blamed the checkpoint ("lacks 1 tensors ... is it the checkpoint of this config?"). Without a quant mode the folder
    loads with its own quantisation."""
    from diffusers import FluxTransformer2DModel, QuantoConfig
    from optimum.quanto.nn import QLinear

    folder = tmp_path / "quanto-int8"
    shutil.copytree(saved_seed1, folder)
    shutil.rmtree(folder / "transformer")
    quantised = FluxTransformer2DModel.from_pretrained(
        saved_seed1 / "transformer", quantization_config=QuantoConfig(weights_dtype="int8"), torch_dtype=torch.float32
    )
    quantised.save_pretrained(folder / "transformer")
    for mode in ("fp8", "int8-weight"):
        with pytest.raises(ConfigError, match=r"saved quantised by diffusers.*quant_method=quanto.*transformer='none'"):
            FluxEngine.from_pretrained(folder, config=mode, device="cpu", dtype=torch.float32)
    engine = FluxEngine.from_pretrained(folder, config="baseline", device="cpu", dtype=torch.float32)
    assert isinstance(engine.transformer.transformer_blocks[0].attn.to_q, QLinear)
