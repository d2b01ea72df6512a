import json

import pytest
import torch

from engine.errors import CheckpointError, VariantError
from engine.models import (
    VARIANTS,
    bfl_to_diffusers,
    diffusers_to_bfl,
    load_local_components,
    save_bfl_single_file,
    synthetic_clip_tokenizer,
    synthetic_components,
    synthetic_t5_tokenizer,
    variant_spec,
)


def _states_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_synthetic_build_is_deterministic_by_seed(tiny_components):
    again = synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=0)
    other = synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=1)
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        assert _states_equal(tiny_components[name], again[name]), name
        assert not _states_equal(tiny_components[name], other[name]), name


def test_synthetic_build_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    synthetic_components("tiny", device="cpu", dtype=torch.float32, seed=7)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_synthetic_weights_are_born_in_the_target_dtype(dtype):
    components = synthetic_components("tiny", device="cpu", dtype=dtype, seed=0)
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        params = list(components[name].parameters())
        assert {p.dtype for p in params} == {dtype}, name
        # random init, not left empty: every tensor has spread unless it is a norm/bias initialised constant
        assert sum(p.float().std().item() > 0 for p in params if p.numel() > 1) > len(params) // 3, name


@pytest.mark.parametrize("variant", ["flux-dev", "flux-schnell"])
def test_real_variants_have_the_published_sizes(variant):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    spec = variant_spec(f"synthetic:{variant}")
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**spec.transformer)
        t5 = T5EncoderModel(T5Config(**spec.t5))
        clip = CLIPTextModel(CLIPTextConfig(**spec.clip))
        vae = AutoencoderKL(**spec.vae)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    # FLUX.1: 11.90B transformer (22.2 GiB in bf16), T5-XXL encoder 4.76B, CLIP-L text 123M, VAE 83.8M
    assert count(transformer) == pytest.approx(11.90e9, rel=0.005)
    assert count(t5) == pytest.approx(4.762e9, rel=0.005)
    assert count(clip) == pytest.approx(123.06e6, rel=0.005)
    assert count(vae) == pytest.approx(83.82e6, rel=0.005)
    assert count(transformer) * 2 / 2**30 == pytest.approx(22.2, abs=0.1)
    assert transformer.config.guidance_embeds == (variant == "flux-dev")


def test_synthetic_tokenizers_have_the_real_vocab_sizes_and_lengths():
    clip = synthetic_clip_tokenizer(49408, 77)
    t5 = synthetic_t5_tokenizer(32100, 512)
    assert len(clip) == 49408 and clip.model_max_length == 77
    assert len(t5) == 32100 and t5.model_max_length == 512
    assert (clip.bos_token_id, clip.eos_token_id) == (49406, 49407)
    assert (t5.pad_token_id, t5.eos_token_id) == (0, 1)
    ids = clip("An astronaut, riding a horse!", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and 49407 in ids
    ids = t5("An astronaut, riding a horse!", padding="max_length", max_length=512).input_ids
    assert len(ids) == 512 and 1 in ids and ids[-1] == 0
    assert variant_spec("flux-schnell").t5_max_length == 256


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(VariantError, match="unknown model variant 'synthetic:flux-pro'.*flux-dev, flux-schnell, tiny"):
        variant_spec("synthetic:flux-pro")


def test_real_variant_on_cpu_is_refused_before_allocating():
    with pytest.raises(VariantError, match="needs a CUDA GPU.*synthetic:tiny"):
        synthetic_components("flux-dev", device="cpu")


def test_bfl_layout_matches_diffusers_own_converter_on_the_real_config():
    """Our converter is sized from the config; diffusers' assumes the real 3072 width. On the real
    dev config (meta tensors: no memory) both must produce the same names and shapes."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    config = dict(VARIANTS["flux-dev"].transformer)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    state = model.state_dict()
    bfl = diffusers_to_bfl(state, config)
    ours = bfl_to_diffusers(dict(bfl), config)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert ours.keys() == theirs.keys() == state.keys()
    assert all(ours[k].shape == theirs[k].shape == state[k].shape for k in state)


def test_bfl_round_trip_restores_every_tensor(tiny_components):
    transformer = tiny_components["transformer"]
    state = transformer.state_dict()
    back = bfl_to_diffusers(diffusers_to_bfl(state, dict(transformer.config)), dict(transformer.config))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tiny_components):
    from diffusers import FluxPipeline

    folder = tmp_path_factory.mktemp("tiny") / "model"
    FluxPipeline(**tiny_components).save_pretrained(folder)
    return folder


def test_diffusers_folder_round_trip(saved_tiny, tiny_components):
    loaded = load_local_components(saved_tiny, device="cpu", dtype=torch.float32)
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        assert _states_equal(loaded[name], tiny_components[name]), name
    assert len(loaded["tokenizer"]) == len(tiny_components["tokenizer"])
    assert loaded["tokenizer_2"]("a fox").input_ids == tiny_components["tokenizer_2"]("a fox").input_ids


def test_bfl_single_file_round_trip(saved_tiny, tiny_components, tmp_path):
    path = save_bfl_single_file(tiny_components["transformer"], tmp_path / "flux1-tiny.safetensors")
    loaded = load_local_components(path, device="cpu", dtype=torch.float32, config_folder=saved_tiny)
    assert _states_equal(loaded["transformer"], tiny_components["transformer"])


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_local_components(tmp_path / "nowhere", device="cpu", dtype=torch.float32)
    with pytest.raises(CheckpointError, match="no model_index.json"):
        load_local_components(tmp_path, device="cpu", dtype=torch.float32)


def test_single_file_needs_its_config_folder(tmp_path):
    path = tmp_path / "flux.safetensors"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="also pass the diffusers-format folder"):
        load_local_components(path, device="cpu", dtype=torch.float32)


def test_truncated_single_file_is_a_clear_error(saved_tiny, tiny_components, tmp_path):
    path = save_bfl_single_file(tiny_components["transformer"], tmp_path / "flux.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file.*truncated"):
        load_local_components(path, device="cpu", dtype=torch.float32, config_folder=saved_tiny)


def test_single_file_with_wrong_keys_is_a_clear_error(saved_tiny, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "not-flux.safetensors"
    save_file({"encoder.weight": torch.randn(4, 4)}, str(path))
    with pytest.raises(CheckpointError, match="lacks the tensor"):
        load_local_components(path, device="cpu", dtype=torch.float32, config_folder=saved_tiny)


def test_truncated_weights_in_a_folder_are_a_clear_error(saved_tiny, tmp_path):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(saved_tiny, folder)
    weights = next((folder / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="could not load the FLUX pipeline"):
        load_local_components(folder, device="cpu", dtype=torch.float32)


def test_folder_config_is_what_loading_reads(saved_tiny):
    config = json.loads((saved_tiny / "transformer" / "config.json").read_text())
    assert config["num_layers"] == VARIANTS["tiny"].transformer["num_layers"]
