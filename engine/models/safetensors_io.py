"""Reading safetensors one tensor at a time into modules built on the meta device (the quantise-while-loading
path's reader), and the files a component folder holds."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import re
from pathlib import Path

import torch

from ..errors import CheckpointError
from .builders import dtype_as_default

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- local loading


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist; pass the path of a local .safetensors")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(
            f"{str(path)!r} is not a readable safetensors file ({err}); it may be truncated or corrupt: "
            "copy or re-save it"
        ) from err


# ----------------------------------------------------------------------------- streamed loading (quantise as read)


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"{str(path)!r} is not a readable safetensors file ({err}); it may be truncated or corrupt: copy or re-save it"
    )


class SafetensorsReader:
    """The tensors of one or more safetensors files, each read from disk only when asked for (one at a time)."""

    def __init__(self, files: list[Path]):
        from safetensors import SafetensorError, safe_open

        self._stack = contextlib.ExitStack()
        self._where: dict[str, tuple[Path, object]] = {}
        for path in files:
            if not path.is_file():
                raise CheckpointError(
                    f"checkpoint file {str(path)!r} does not exist; pass the path of a local .safetensors"
                )
            try:
                handle = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except (SafetensorError, OSError, RuntimeError, ValueError) as err:
                self.close()
                raise _unreadable(path, err) from err
            names = handle.keys()  # a safe_open handle is not iterable
            self._where.update((key, (path, handle)) for key in names)

    def keys(self) -> set[str]:
        return set(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        from safetensors import SafetensorError

        path, handle = self._where[key]
        try:
            return handle.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise _unreadable(path, err) from err

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape, from the file's header (nothing is read)."""
        return tuple(self._where[key][1].get_slice(key).get_shape())

    def metadata(self) -> dict:
        handles = {id(h): h for _, h in self._where.values()}
        return next((h.metadata() or {} for h in handles.values()), {})

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stream_into(
    model: torch.nn.Module,
    reader,
    device: torch.device | str,
    target_dtype,
    quantizer=None,
    source: str = "",
) -> None:
    """Fill `model`, built with its parameters on the meta device, from `reader`, one module at a time.

    Each tensor is read, cast to `target_dtype(name, meta_tensor)` and moved to `device` as its module comes up,
    so at most one module's tensors exist outside the model. The Linears `quantizer` names
    (`quantizer.layer_names(model)`) are handed, filled, to `quantizer(name, linear)` and replaced by what it
    returns, before the next module is read: the device never holds more than one of them unquantised.
    Buffers the checkpoint does not hold (non-persistent ones, built for real by `empty_model`) are moved to
    `device`. Tied weights are tied afterwards (`tie_weights`); anything still on the meta device then is a
    tensor the checkpoint lacks (CheckpointError).
    """
    device = torch.device(device)
    targets = quantizer.layer_names(model) if quantizer is not None else set()
    consumed: set[str] = set()
    with torch.no_grad():
        for name in [n for n, _ in model.named_modules()]:  # names: a module list would pin every bf16 layer
            module = model.get_submodule(name)
            _fill_module(module, name, reader, device, target_dtype, consumed, source)
            if name in targets:
                _check_filled(module, name, source)
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, quantizer(name, module))
            del module
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    _check_filled(model, "", source)
    unused = sorted(reader.keys() - consumed)
    if unused:
        logger.warning("%s: %d tensors the model does not use were ignored, e.g. %s", source, len(unused), unused[:3])
    if quantizer is not None:
        quantizer.finish(model)
    model.eval().requires_grad_(False)


class RenamedReader:
    """A reader under the model's names for tensors the checkpoint holds under others: `names` maps the model's name
    to the checkpoint's; every other tensor keeps its name."""

    def __init__(self, reader, names: dict[str, str]):
        self._reader, self._names = reader, names
        renamed = set(names.values())
        self._keys = (reader.keys() - renamed) | set(names)

    def _source(self, key: str) -> str:
        return self._names.get(key, key)

    def keys(self) -> set[str]:
        return set(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def get(self, key: str) -> torch.Tensor:
        return self._reader.get(self._source(key))

    def shape(self, key: str) -> tuple[int, ...]:
        return self._reader.shape(self._source(key))

    def metadata(self) -> dict:
        return self._reader.metadata()


def as_loaded_by_library(model: torch.nn.Module, reader):
    """`reader` under the names transformers' own loader gives the checkpoint's tensors for `model` (FLUX.1's CLIP
    folder stores `text_model.`-prefixed keys, which transformers 5 strips; base-model prefixes): a streamed load
    then reads what from_pretrained would. `reader` itself for a diffusers model, or where nothing is renamed."""
    if not hasattr(model, "base_model_prefix"):  # diffusers' models load their keys as they are
        return reader
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    wanted = model.state_dict(keep_vars=True)
    names = {}
    for key in sorted(reader.keys() - wanted.keys()):
        renamed, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, wanted)
        if renamed in wanted and renamed not in reader and renamed not in names:
            names[renamed] = key
    return RenamedReader(reader, names) if names else reader


def _check_filled(module: torch.nn.Module, name: str, source: str) -> None:
    state = module.state_dict(keep_vars=True, prefix=f"{name}." if name else "")
    missing = [key for key, value in state.items() if isinstance(value, torch.Tensor) and value.is_meta]
    if missing:
        raise CheckpointError(
            f"{source!r} lacks {len(missing)} tensors of its model, e.g. {missing[:3]}; is it the checkpoint of "
            "this config (and complete)?"
        )


def _fill_module(module, name, reader, device, target_dtype, consumed: set[str], source: str) -> None:
    for leaf, meta in list(module._parameters.items()) + list(module._buffers.items()):
        if meta is None:
            continue
        key = f"{name}.{leaf}" if name else leaf
        if not meta.is_meta:  # a non-persistent buffer built for real, or a weight tied to one already read
            if meta.device != device and leaf in module._buffers:
                module._buffers[leaf] = meta.to(device)
            continue
        if key not in reader:
            continue  # tied (tie_weights) or missing (reported after)
        tensor = reader.get(key)
        if tensor.shape != meta.shape:
            raise CheckpointError(
                f"{source!r}: tensor {key!r} has shape {tuple(tensor.shape)}, the model's config needs "
                f"{tuple(meta.shape)}; is it the checkpoint of this config?"
            )
        tensor = tensor.to(device=device, dtype=target_dtype(key, meta))
        consumed.add(key)
        if leaf in module._parameters:
            module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[leaf] = tensor
        del tensor


def meta_dtype(key: str, meta: torch.Tensor) -> torch.dtype:
    return meta.dtype


def _component_class(folder: Path, component: str):
    library, class_name = json.loads((folder / "model_index.json").read_text())[component]
    return library, getattr(importlib.import_module(library), class_name)


def empty_model(folder: Path, component: str, dtype: torch.dtype):
    """`component` of the diffusers-format `folder`, built from its config with its parameters on the meta device
    (buffers for real, as the libraries' loaders do), in `dtype`; with the per-tensor dtype rule of its library's
    loader: the meta tensor's dtype, or fp32 where transformers keeps a module in fp32 (its dtype plan)."""
    from accelerate import init_empty_weights

    library, cls = _component_class(folder, component)
    subfolder = folder / component
    with init_empty_weights(include_buffers=False):
        if library == "diffusers":
            with dtype_as_default(dtype):
                model = cls.from_config(cls.load_config(str(subfolder)))
        else:
            model = cls._from_config(cls.config_class.from_pretrained(str(subfolder)), dtype=dtype)
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return model, meta_dtype
    kept = [(re.compile(glob.replace("*", ".*")), kept_dtype) for glob, kept_dtype in plan.items()]

    def target_dtype(key: str, meta: torch.Tensor) -> torch.dtype:
        if meta.is_floating_point():
            for pattern, kept_dtype in kept:
                if pattern.search(key):
                    return kept_dtype
        return meta.dtype

    return model, target_dtype


# the files each library reads from a component folder, in its own order of preference: diffusers (transformer, VAE)
# reads a shard index before a single file, transformers (text encoders) a single file before an index; a folder with
# both must give us the weights the library would load, not the other set
LIBRARY_WEIGHT_FILES = (
    ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors"),
    ("model.safetensors", "model.safetensors.index.json"),
)


def with_variant(name: str, variant: str | None) -> str:
    """A weights file's name for a variant, as diffusers and transformers spell it (model.fp16.safetensors,
    model.safetensors.index.fp16.json)."""
    if variant is None:
        return name
    stem, _, suffix = name.rpartition(".")
    return f"{stem}.{variant}.{suffix}"


def component_weight_files(subfolder: Path, variant: str | None = None) -> list[Path] | None:
    """The safetensors files a library's loader reads for one component folder (sharded or not; of `variant`, such
    as "fp16", when given); None if it has none (e.g. only .bin weights)."""
    for names in LIBRARY_WEIGHT_FILES:
        for name in names:
            path = subfolder / with_variant(name, variant)
            if not path.is_file():
                continue
            if not name.endswith(".index.json"):
                return [path]
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
                return [subfolder / shard for shard in sorted(set(weight_map.values()))]
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise CheckpointError(
                    f"{str(path)!r} is not a readable shard index ({type(err).__name__}: {err}); a shard index is "
                    'JSON with a "weight_map" of tensor names to files: copy it again from the model you downloaded'
                ) from err
    return None
