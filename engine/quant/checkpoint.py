"""Quantised checkpoints: one fp8 transformer file, and diffusers-layout pipeline folders.

`save_quantized(pipe, folder)` writes a diffusers-layout folder whose transformer is
saved in fp8 (`save_fp8_transformer`'s file plus a marker); `load_local_components` / FluxEngine.from_pretrained
load it as saved. fp8 only: the quanto and nf4 modes are refused with a pointer to quantising while loading.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..config import QuantConfig
from ..errors import CheckpointError, ConfigError
from .apply import ComponentQuant, mark_quantized, quant_mode_of
from .fp8 import Fp8Linear, fp8_layer_compute
from .policy import FUSED_VIEWS, kept_linears, parent_of

logger = logging.getLogger(__name__)


FP8_FORMAT = "flux-engine-fp8/1"
# a folder written by save_quantized: transformer/QUANT_MARKER says how transformer/QUANT_WEIGHTS was saved
QUANT_MARKER = "flux_engine_quant.json"
QUANT_WEIGHTS = "flux-engine-fp8.safetensors"


def _unsupported_save(mode: str) -> ConfigError:
    return ConfigError(
        f"saving a transformer quantised as {mode!r} is not supported yet; use 'fp8' (QuantConfig(transformer="
        f"'fp8')) to save one, or keep the bf16 checkpoint and load it with quant=QuantConfig(transformer={mode!r}): "
        "it is then quantised while loading, one layer at a time, without a full-size peak"
    )


def _unfused_names(block_name: str, fused_child: str, module: Fp8Linear, block: nn.Module) -> list[tuple[str, int]]:
    """(diffusers name, rows) of each projection a fused fp8 Linear computes."""
    views = FUSED_VIEWS[fused_child]
    sizes = [block.attn.inner_dim] * len(views)  # q, k, v (image or text stream) are each heads * head_dim
    if "proj_mlp" in views:
        sizes[-1] = module.out_features - sum(sizes[:-1])
    return [(f"{block_name}.{v}" if block_name else v, s) for v, s in zip(views, sizes, strict=True)]


def save_fp8_transformer(transformer: nn.Module, path: str | Path) -> Path:
    """Write an fp8-quantised transformer to one safetensors file (e4m3 weights, fp32 scales, the rest as is).

    Fused projections are saved split back into the diffusers names: their scales are per row, so the
    split is exact, and the file loads into the plain diffusers layout (fused again, exactly, by the
    fused-attention presets).
    """
    from safetensors.torch import save_file

    mode = quant_mode_of(transformer)
    if mode is not None and mode != "fp8":
        raise _unsupported_save(mode)
    if mode is None:
        raise ConfigError(
            "save_fp8_transformer takes a transformer quantised with mode 'fp8' (QuantConfig(transformer='fp8')); "
            "this one is not quantised: save it with save_pretrained"
        )
    state, fp8_layers = {}, []
    modules = dict(transformer.named_modules())
    for name, tensor in transformer.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        module = modules.get(module_name)
        if not isinstance(module, Fp8Linear):
            state[name] = tensor
            continue
        block_name, _, child = module_name.rpartition(".")
        if child in FUSED_VIEWS and block_name and isinstance(getattr(modules[block_name], child, None), Fp8Linear):
            offset = 0
            for target, rows in _unfused_names(block_name, child, module, modules[block_name]):
                state[f"{target}.{leaf}"] = tensor[offset : offset + rows]
                offset += rows
        else:
            state[name] = tensor
    for name in state:
        if name.endswith(".weight_fp8"):
            fp8_layers.append(name.removesuffix(".weight_fp8"))
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    config = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    metadata = {"format": FP8_FORMAT, "config": json.dumps(config), "fp8_layers": json.dumps(sorted(fp8_layers))}
    path = Path(path)
    save_file(state, str(path), metadata=metadata)
    return path


def load_fp8_transformer(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16):
    """The FluxTransformer2DModel of a `save_fp8_transformer` file, fp8 layers rebuilt, nothing re-quantised.

    Built on the meta device and read one tensor at a time straight to `device` (no host copy of the file).
    Tensors other than the fp8 weights and their scales are cast to `dtype`.
    """
    from diffusers import FluxTransformer2DModel

    from ..models.builders import dtype_as_default
    from ..models.safetensors_io import SafetensorsReader, stream_into

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist; pass the path of a local .safetensors")
    device = torch.device(device)
    with SafetensorsReader([path]) as reader:
        metadata = reader.metadata()
        if metadata.get("format") != FP8_FORMAT:
            raise CheckpointError(
                f"{str(path)!r} is not a flux-engine fp8 checkpoint (format {metadata.get('format')!r}, expected "
                f"{FP8_FORMAT!r}); write one with engine.quant.save_fp8_transformer"
            )
        with torch.device("meta"), dtype_as_default(dtype):
            transformer = FluxTransformer2DModel.from_config(json.loads(metadata["config"]))
            for name in json.loads(metadata["fp8_layers"]):
                linear = transformer.get_submodule(name)
                compute = fp8_layer_compute(device, linear.in_features, linear.out_features)
                parent, child = parent_of(transformer, name)
                fp8 = Fp8Linear(linear.in_features, linear.out_features, linear.bias is not None, compute, "meta")
                setattr(parent, child, fp8)
        stream_into(transformer, reader, device, lambda key, meta: meta.dtype, source=str(path))
    record = ComponentQuant(mode="fp8", kept=kept_linears(transformer, "transformer"))
    record.quantized = [n for n, m in transformer.named_modules() if isinstance(m, Fp8Linear)]
    mark_quantized(transformer, record)
    return transformer


# ----------------------------------------------------------------------------- quantised pipeline folders


def save_quantized(pipe, folder: str | Path) -> Path:
    """Write `pipe` as a diffusers-layout folder with its transformer saved quantised, loadable without
    quantising again by `FluxEngine.from_pretrained(folder, config=...)` / `load_local_components(folder, ...)`.

    The other components are written by diffusers' save_pretrained; the transformer folder holds its config.json,
    the fp8 weights (QUANT_WEIGHTS, save_fp8_transformer's format: diffusers names, fused projections split) and
    a marker (QUANT_MARKER) that the loader looks for. Plain diffusers cannot load the transformer of such a
    folder. Supported: a transformer in 'fp8' with unquantised text encoders (quantise those while loading).
    """
    from diffusers import FluxPipeline

    folder = Path(folder)
    transformer = pipe.transformer
    mode = quant_mode_of(transformer)
    if mode is None:
        raise ConfigError(
            "save_quantized writes a quantised transformer; this pipeline's is not quantised. Save it with "
            "pipe.save_pretrained(folder), or optimise it with QuantConfig(transformer='fp8') first"
        )
    if mode != "fp8":
        raise _unsupported_save(mode)
    for component in ("text_encoder", "text_encoder_2"):
        encoder_mode = quant_mode_of(getattr(pipe, component, None))
        if encoder_mode is not None:
            raise ConfigError(
                f"save_quantized writes the text encoders unquantised, and {component} is quantised as "
                f"{encoder_mode!r}; save from a pipeline whose text encoders are not quantised and load with "
                f"quant=QuantConfig({component}={encoder_mode!r}) (quantised while loading, no full-size peak)"
            )
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(
            f"save_quantized writes a new folder; {str(folder)!r} exists and is not empty: pass a new path"
        )
    rest = FluxPipeline(**{**pipe.components, "transformer": None})
    with _diffusers_quiet():  # it logs that the (absent) transformer "cannot be saved": written below
        rest.save_pretrained(str(folder))
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["transformer"] = ["diffusers", type(transformer).__name__]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    transformer_dir = folder / "transformer"
    transformer_dir.mkdir(parents=True, exist_ok=True)
    transformer.save_config(str(transformer_dir))
    save_fp8_transformer(transformer, transformer_dir / QUANT_WEIGHTS)
    marker = {"format": FP8_FORMAT, "mode": mode, "weights": QUANT_WEIGHTS}
    (transformer_dir / QUANT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return folder


@contextlib.contextmanager
def _diffusers_quiet():
    from diffusers.utils import logging as diffusers_logging

    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(previous)


def saved_quantization(folder: str | Path) -> dict | None:
    """The marker of a folder written by save_quantized ({'format', 'mode', 'weights'}), or None for a plain one."""
    marker = Path(folder) / "transformer" / QUANT_MARKER
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{str(marker)!r} is not readable JSON ({err}); save the folder again") from err
    if info.get("format") != FP8_FORMAT:
        raise CheckpointError(
            f"{str(marker)!r} names format {info.get('format')!r}; this engine reads {FP8_FORMAT!r}: save the "
            "folder again with engine.quant.save_quantized"
        )
    return info


def load_saved_quantized_transformer(folder: str | Path, device, dtype: torch.dtype, quant: QuantConfig | None = None):
    """The quantised transformer of a save_quantized folder (None for a plain folder), as saved. `quant` may ask
    for the saved mode or 'none' for the transformer (it runs quantised either way); another mode is refused."""
    info = saved_quantization(folder)
    if info is None:
        return None
    wanted = quant.transformer if quant is not None else "none"
    if wanted not in ("none", info["mode"]):
        raise ConfigError(
            f"{str(folder)!r} holds a transformer saved quantised as {info['mode']!r}; the config asks "
            f"{wanted!r}, which cannot be made from it. Use QuantConfig(transformer={info['mode']!r}), or load "
            "the bf16 folder"
        )
    if quant is not None and wanted == "none":
        logger.warning("%s holds an %s transformer: it runs quantised although the config asks 'none'", folder,
                       info["mode"])  # fmt: skip
    return load_fp8_transformer(Path(folder) / "transformer" / info["weights"], device=device, dtype=dtype)
