"""Local checkpoints: a diffusers-format folder, or a BFL single-file transformer with a folder for the rest;
components to be quantised are built on the meta device and filled (and quantised) one layer at a time."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from .bfl import BflReader, bfl_to_diffusers, config_for_bfl_file, holds_diffusers_names
from .builders import dtype_as_default
from .safetensors_io import (
    SafetensorsReader,
    as_loaded_by_library,
    component_weight_files,
    empty_model,
    meta_dtype,
    read_safetensors,
    stream_into,
)
from .variants import synthetic_hint

logger = logging.getLogger(__name__)

# what a FluxPipeline folder must hold (FluxPipeline's optional image_encoder / feature_extractor may be absent)
PIPELINE_COMPONENTS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae")


# the files a tokenizer folder needs for its vocabulary, any one set: the fast tokenizer's, CLIP's BPE, T5's model
TOKENIZER_VOCABULARIES = ({"tokenizer.json"}, {"vocab.json", "merges.txt"}, {"spiece.model"})

# a weights file of a variant, as diffusers and transformers name them (model.fp16.safetensors, sharded or not)
VARIANT_FILE = re.compile(r"^(?:model|diffusion_pytorch_model)(?:-\d+-of-\d+)?\.([^.]+)\.safetensors$")

# a single-file transformer: BFL's releases end in .safetensors, some mirrors (ComfyUI's) in .sft
SINGLE_FILE_SUFFIXES = (".safetensors", ".sft")


def _check_diffusers_folder(folder: Path, single_file: bool = False) -> None:
    """A readable model_index.json and a folder for each component (the transformer's may be absent when a
    single-file transformer replaces it), before diffusers is asked: its own messages name its internals."""
    if not folder.exists():
        raise CheckpointError(
            f"model folder {str(folder)!r} does not exist; pass a local diffusers-format folder{synthetic_hint(folder)}"
        )
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(
            f"{str(folder)!r} is not a diffusers-format FLUX folder (no model_index.json); save one with "
            "`pipe.save_pretrained(folder)` or pass a BFL single-file transformer with its config folder"
        )
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{str(index_path)!r} is not readable JSON ({err}); copy it again from the model you downloaded"
        ) from err
    needed = [name for name in PIPELINE_COMPONENTS if not (single_file and name == "transformer")]
    missing = [name for name in needed if not isinstance(index, dict) or not (folder / name).is_dir()]
    if missing:
        raise CheckpointError(
            f"{str(folder)!r} lacks the component folder(s) {', '.join(missing)}; a FLUX.1 diffusers folder holds "
            f"{', '.join(PIPELINE_COMPONENTS)} beside model_index.json: copy the whole model folder"
        )
    for name in ("tokenizer", "tokenizer_2"):  # transformers loads a tokenizer folder without its vocabulary as a
        files = {p.name for p in (folder / name).iterdir()}  # near-empty one: every prompt would encode to nothing
        if not any(vocab <= files for vocab in TOKENIZER_VOCABULARIES):
            raise CheckpointError(
                f"{str(folder / name)!r} holds no vocabulary (it has {sorted(files) or 'no files'}); a FLUX.1 "
                f"tokenizer folder holds {' or '.join('+'.join(sorted(v)) for v in TOKENIZER_VOCABULARIES)}: copy "
                "the folder again from the model you downloaded"
            )


def _load_quantizer(component: str, quant):
    mode = getattr(quant, component)
    if mode == "none":
        return None
    from ..quant.apply import LoadQuantizer

    return LoadQuantizer(component, mode, quant.nf4_double_quant)


def _check_not_saved_quantised(folder: Path, component: str, mode: str) -> None:
    """A component folder saved quantised by diffusers or transformers (its config.json's `quantization_config`) holds
    no plain weights to quantise while loading: before, its missing plain tensors were reported as a broken
    checkpoint."""
    config = folder / component / "config.json"
    try:
        saved = json.loads(config.read_text()).get("quantization_config")
    except (OSError, ValueError):
        return  # no config to read: the load itself reports what is wrong with the folder
    if not saved:
        return
    details = ", ".join(f"{key}={value}" for key, value in saved.items() if isinstance(value, (str, int, float, bool)))
    raise ConfigError(
        f"{str(folder / component)!r} was saved quantised by diffusers / transformers ({details}); QuantConfig("
        f"{component}={mode!r}) quantises plain weights as they load, and this folder holds none. Nothing was "
        f"loaded. Keep its own quantisation with QuantConfig({component}='none') (or a preset without quantisation: "
        "'baseline', 'compile', 'kernels'), or load the unquantised checkpoint"
    )


def load_component_quantized(folder: Path, component: str, device, dtype: torch.dtype, quant, variant=None):
    """`component` of a diffusers-format folder, each quantisable Linear quantised (per `quant`) as it is read:
    the device peak is the quantised component plus one layer. None when the folder has no safetensors for it."""
    files = component_weight_files(folder / component, variant)
    if files is None:
        logger.warning(
            "%s has no safetensors weights: loading it whole and quantising afterwards (the peak is its full size)",
            folder / component,
        )
        return None
    model, target_dtype = empty_model(folder, component, dtype)
    with SafetensorsReader(files) as reader:
        named = as_loaded_by_library(model, reader)
        stream_into(model, named, device, target_dtype, _load_quantizer(component, quant), str(folder / component))
    return model


def load_transformer_single_file(path: str | Path, config_folder: str | Path, device, dtype: torch.dtype, quant=None):
    """A FluxTransformer2DModel from a BFL single-file `.safetensors`; config from `config_folder/transformer`.

    quant: a QuantConfig; a transformer mode other than 'none' quantises each Linear as it is read (the device
    never holds the bf16 transformer).
    """
    from diffusers import FluxTransformer2DModel

    config_path = Path(config_folder) / "transformer" / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"no transformer config at {str(config_path)!r}; the config folder must be a diffusers-format "
            "FLUX folder (it provides the architecture and the other components)"
        )
    # a Fill / Canny / Depth single file beside a dev folder: the file's input width wins
    config = config_for_bfl_file(Path(path), json.loads(config_path.read_text()))
    quantizer = _load_quantizer("transformer", quant) if quant is not None else None
    diffusers_names = holds_diffusers_names(Path(path))  # a diffusers transformer's weights saved as one file
    try:
        if quantizer is not None:
            return _stream_single_file(Path(path), config, device, dtype, quantizer, diffusers_names)
        state = read_safetensors(Path(path))
        state = state if diffusers_names else bfl_to_diffusers(state, config)
    except KeyError as err:
        raise CheckpointError(
            f"{str(path)!r} lacks the tensor {err.args[0]!r} of a BFL FLUX transformer with "
            f"{config['num_layers']} double and {config['num_single_layers']} single blocks; is it the "
            "transformer of the same variant as the config folder?"
        ) from err
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(config)
    try:
        transformer.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{str(path)!r} does not fit the transformer config: {err}") from err
    return transformer.to(device).eval().requires_grad_(False)


def _stream_single_file(path: Path, config: dict, device, dtype: torch.dtype, quantizer, diffusers_names: bool):
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with SafetensorsReader([path]) if diffusers_names else BflReader(path, config) as reader:
        with init_empty_weights(include_buffers=False), dtype_as_default(dtype):
            transformer = FluxTransformer2DModel.from_config(config)
        stream_into(transformer, reader, device, meta_dtype, quantizer, str(path))
    return transformer


def _fix_for(err: Exception, folder: Path, variant: str | None) -> str:
    """What to do about diffusers' error loading a folder: the variants its weight files carry, where one is asked
    for that it lacks or none is and it has only variants; else check the files."""
    named = (VARIANT_FILE.match(path.name) for path in folder.glob("*/*.safetensors"))
    found = sorted({match.group(1) for match in named if match})
    if variant is not None and variant not in found:
        carried = f"its variants: {', '.join(found)}" if found else "its files carry no variant"
        return f"The folder has no weights of variant {variant!r} ({carried}): pass one of those, or leave variant= out"
    if variant is None and found and "variant" in str(err):
        return f"The folder's weights carry a variant in their names: pass variant={found[0]!r}"
    return "Check that every component folder is complete (a truncated or missing weight file is the usual cause)"


def load_local_components(
    path: str | Path,
    device: torch.device | str,
    dtype: torch.dtype,
    config_folder: str | Path | None = None,
    quant=None,
    variant: str | None = None,
) -> dict:
    """FluxPipeline components from local files only.

    `path` is a diffusers-format folder, or a BFL single-file transformer `.safetensors`, in which
    case `config_folder` (a diffusers-format folder) provides the architecture and the other parts.

    quant: a QuantConfig (engine.config). Each component with a mode other than 'none' is built on the meta
    device and quantised layer by layer while its safetensors are read (engine.quant.apply.LoadQuantizer): the
    device peak is the quantised size plus one layer, and the result is identical to loading in `dtype` and
    calling apply_quantization with the same QuantConfig (which then leaves it as it is).
    A folder written by engine.quant.checkpoint.save_quantized loads its quantised transformer as saved, whatever
    `quant` says for it ('none' or the saved mode; another mode is refused).
    variant: the weight files' variant, as in diffusers (`variant="fp16"` reads model.fp16.safetensors).
    """
    from diffusers import FluxPipeline

    from ..config import QuantConfig

    quant = quant if quant is not None else QuantConfig()
    path = Path(path)
    single_file = path.suffix in SINGLE_FILE_SUFFIXES or path.is_file()
    if single_file and config_folder is None:
        raise CheckpointError(
            f"{str(path)!r} is a single-file transformer; also pass the diffusers-format folder that holds "
            "its config and the other components (config_folder=... / --config-folder)"
        )
    folder = Path(config_folder) if single_file else path
    if single_file and not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist; pass the path of a local .safetensors")
    _check_diffusers_folder(folder, single_file)
    overrides = {}
    if single_file:
        overrides["transformer"] = load_transformer_single_file(path, folder, device, dtype, quant=quant)
    else:
        from ..quant.checkpoint import load_saved_quantized_transformer

        saved = load_saved_quantized_transformer(folder, device, dtype, quant)
        if saved is not None:
            overrides["transformer"] = saved
    quantised = [c for c in QuantConfig.COMPONENTS if c not in overrides and getattr(quant, c) != "none"]
    for component in quantised:
        _check_not_saved_quantised(folder, component, getattr(quant, component))
    for component in quantised:
        loaded = load_component_quantized(folder, component, device, dtype, quant, variant)
        if loaded is not None:
            overrides[component] = loaded
    try:
        pipe = FluxPipeline.from_pretrained(
            str(folder), dtype=dtype, local_files_only=True, variant=variant, **overrides
        )
    except Exception as err:  # noqa: BLE001 - diffusers raises many types for one cause: a bad folder
        raise CheckpointError(
            f"could not load the FLUX pipeline from {str(folder)!r}: {type(err).__name__}: {err}. "
            + _fix_for(err, folder, variant)
        ) from err
    pipe.to(device)
    return dict(pipe.components)
