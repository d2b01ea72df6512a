"""The BFL single-file transformer format: its key names and fused layouts against diffusers', both ways."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from .safetensors_io import SafetensorsReader

# ----------------------------------------------------------------------------- BFL single-file format

# diffusers name -> BFL name, for tensors that map one to one (per block, `{i}` is the block index).
_BFL_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}
_BFL_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
}
_BFL_DOUBLE_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_BFL_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_BFL_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    # BFL's final adaLN splits into (shift, scale); diffusers' into (scale, shift).
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def diffusers_to_bfl(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict in the BFL (black-forest-labs/flux) layout."""
    out: dict[str, torch.Tensor] = {}
    for src, dst in _BFL_TOP.items():
        for kind in ("weight", "bias"):
            if f"{src}.{kind}" in state:
                out[f"{dst}.{kind}"] = state[f"{src}.{kind}"]
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(state[f"norm_out.linear.{kind}"])
    for i in range(config["num_layers"]):
        pre, bfl = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for src, dst in _BFL_DOUBLE.items():
            for kind in ("weight", "bias"):
                out[f"{bfl}{dst}.{kind}"] = state[f"{pre}{src}.{kind}"]
        for src, dst in _BFL_DOUBLE_NORMS.items():
            out[f"{bfl}{dst}.scale"] = state[f"{pre}{src}.weight"]
        for kind in ("weight", "bias"):
            out[f"{bfl}img_attn.qkv.{kind}"] = torch.cat([state[f"{pre}attn.to_{p}.{kind}"] for p in "qkv"])
            out[f"{bfl}txt_attn.qkv.{kind}"] = torch.cat([state[f"{pre}attn.add_{p}_proj.{kind}"] for p in "qkv"])
    for i in range(config["num_single_layers"]):
        pre, bfl = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for src, dst in _BFL_SINGLE.items():
            for kind in ("weight", "bias"):
                out[f"{bfl}{dst}.{kind}"] = state[f"{pre}{src}.{kind}"]
        for src, dst in _BFL_SINGLE_NORMS.items():
            out[f"{bfl}{dst}.scale"] = state[f"{pre}{src}.weight"]
        for kind in ("weight", "bias"):
            parts = [state[f"{pre}attn.to_{p}.{kind}"] for p in "qkv"] + [state[f"{pre}proj_mlp.{kind}"]]
            out[f"{bfl}linear1.{kind}"] = torch.cat(parts)
    return out


@dataclass(frozen=True)
class _BflSource:
    """Where one diffusers tensor lives in a BFL checkpoint: a key, optionally a range of its rows, optionally
    with its two halves swapped (the final adaLN)."""

    key: str
    rows: tuple[int, int | None] | None = None
    swap_halves: bool = False

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            tensor = tensor[self.rows[0] : self.rows[1]]
        return _swap_halves(tensor) if self.swap_halves else tensor


def _bfl_plan(config: dict) -> dict[str, _BflSource]:
    """diffusers name -> its source in a BFL checkpoint of `config` (sized from it, not assuming 3072 wide)."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    thirds = [(j * inner, (j + 1) * inner) for j in range(3)]
    plan: dict[str, _BflSource] = {}
    for dst, src in _BFL_TOP.items():
        if dst.startswith("time_text_embed.guidance") and not config.get("guidance_embeds", False):
            continue
        for kind in ("weight", "bias"):
            plan[f"{dst}.{kind}"] = _BflSource(f"{src}.{kind}")
    for kind in ("weight", "bias"):
        plan[f"norm_out.linear.{kind}"] = _BflSource(f"final_layer.adaLN_modulation.1.{kind}", swap_halves=True)
    for i in range(config["num_layers"]):
        pre, bfl = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for dst, src in _BFL_DOUBLE.items():
            for kind in ("weight", "bias"):
                plan[f"{pre}{dst}.{kind}"] = _BflSource(f"{bfl}{src}.{kind}")
        for dst, src in _BFL_DOUBLE_NORMS.items():
            plan[f"{pre}{dst}.weight"] = _BflSource(f"{bfl}{src}.scale")
        for kind in ("weight", "bias"):
            for p, rows in zip("qkv", thirds, strict=True):
                plan[f"{pre}attn.to_{p}.{kind}"] = _BflSource(f"{bfl}img_attn.qkv.{kind}", rows)
                plan[f"{pre}attn.add_{p}_proj.{kind}"] = _BflSource(f"{bfl}txt_attn.qkv.{kind}", rows)
    for i in range(config["num_single_layers"]):
        pre, bfl = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for dst, src in _BFL_SINGLE.items():
            for kind in ("weight", "bias"):
                plan[f"{pre}{dst}.{kind}"] = _BflSource(f"{bfl}{src}.{kind}")
        for dst, src in _BFL_SINGLE_NORMS.items():
            plan[f"{pre}{dst}.weight"] = _BflSource(f"{bfl}{src}.scale")
        for kind in ("weight", "bias"):
            for p, rows in zip("qkv", thirds, strict=True):
                plan[f"{pre}attn.to_{p}.{kind}"] = _BflSource(f"{bfl}linear1.{kind}", rows)
            plan[f"{pre}proj_mlp.{kind}"] = _BflSource(f"{bfl}linear1.{kind}", (3 * inner, None))
    return plan


def _check_bfl_keys(keys: set[str], plan: dict[str, _BflSource], config: dict) -> None:
    """KeyError for the first tensor the plan needs that `keys` lacks; CheckpointError for tensors it does not use."""
    for source in plan.values():
        if source.key not in keys:
            raise KeyError(source.key)
    unexpected = sorted(keys - {source.key for source in plan.values()})
    if unexpected:
        raise CheckpointError(
            f"the checkpoint has {len(unexpected)} tensors a FLUX transformer of this config does not use, "
            f"e.g. {unexpected[:3]}; is it a FLUX.1 transformer with {config['num_layers']} double and "
            f"{config['num_single_layers']} single blocks?"
        )


_BFL_PREFIX = "model.diffusion_model."


def bfl_to_diffusers(checkpoint: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The inverse of `diffusers_to_bfl`, sized from `config` (diffusers' own converter assumes 3072 wide)."""
    state = {k.removeprefix(_BFL_PREFIX): v for k, v in checkpoint.items()}
    plan = _bfl_plan(config)
    _check_bfl_keys(set(state), plan, config)
    return {name: source.take(state[source.key]) for name, source in plan.items()}


def save_bfl_single_file(transformer, path: str | Path) -> Path:
    """Write a diffusers FluxTransformer2DModel as one BFL-layout `.safetensors` file."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in transformer.state_dict().items()}
    save_file(diffusers_to_bfl(state, dict(transformer.config)), str(path))
    return path


_INPUT_WEIGHTS = (_BFL_PREFIX + "img_in.weight", "img_in.weight", "x_embedder.weight")  # BFL's names, diffusers'


def holds_diffusers_names(path: Path) -> bool:
    """Whether the single file at `path` holds a transformer in diffusers' names (a diffusion_pytorch_model
    .safetensors saved alone) rather than BFL's."""
    with SafetensorsReader([path]) as reader:
        return "x_embedder.weight" in reader


def config_for_bfl_file(path: Path, config: dict) -> dict:
    """`config` with the input width of the checkpoint at `path` (BFL's names or diffusers'): FLUX.1 Fill (384) and
    Canny / Depth (128) ship as single files beside a dev folder, whose config says 64. Their output stays 64 wide."""
    with SafetensorsReader([path]) as reader:
        key = next((k for k in _INPUT_WEIGHTS if k in reader), None)
        if key is None:
            return config  # the key check names what is missing
        width = reader.shape(key)[1]
    if width == config["in_channels"]:
        return config
    return {**config, "in_channels": width, "out_channels": config.get("out_channels") or config["in_channels"]}


class BflReader:
    """A BFL single-file transformer read in diffusers names, one tensor at a time (fused qkv / linear1 rows are
    sliced out of the last BFL tensor read, which is kept for its next slices)."""

    def __init__(self, path: Path, config: dict):
        self._reader = SafetensorsReader([path])
        keys = self._reader.keys()
        self._prefix = _BFL_PREFIX if any(k.startswith(_BFL_PREFIX) for k in keys) else ""
        self._plan = _bfl_plan(config)
        try:
            _check_bfl_keys({k.removeprefix(self._prefix) for k in keys}, self._plan, config)
        except (KeyError, CheckpointError):
            self.close()
            raise
        self._last: tuple[str, torch.Tensor] | None = None

    def keys(self) -> set[str]:
        return set(self._plan)

    def __contains__(self, key: str) -> bool:
        return key in self._plan

    def get(self, key: str) -> torch.Tensor:
        source = self._plan[key]
        if self._last is None or self._last[0] != source.key:
            self._last = None  # drop the previous tensor before reading the next
            self._last = (source.key, self._reader.get(self._prefix + source.key))
        return source.take(self._last[1])

    def close(self) -> None:
        self._last = None
        self._reader.close()

    def __enter__(self) -> BflReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
