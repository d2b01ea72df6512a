"""LoRA adapters on the engine's quantised layers (fp8, int8 / fp8 weight-only, nf4), fused projections included.

PEFT wraps nn.Linear and a few library layers; the engine's Fp8Linear and the FusedAway placeholders of fused,
quantised projections are neither. `quantized_lora_dispatch()`, a context manager around diffusers' loading calls
(engine/lora.py), registers `QuantizedLoraLinear` for them, and for optimum-quanto's and bitsandbytes' layers, through
PEFT's custom-layer dispatch (`LoraConfig._register_custom_module`):
- forward: the base runs quantised as it is, and each acting adapter's update is added beside it in the adapter's
  dtype (PEFT's own `lora.Linear.forward`); the base is never dequantised. A FusedAway part never runs: its fused
  block adds the part's update to its columns of the fused GEMM (engine.lora.add_fused_lora).
- merge (`fuse_lora`): the rows an adapter changes are dequantised, every merged adapter's delta is added in fp32, and
  the rows are quantised again, once, from the original codes (never from codes merged before); unmerge gives the
  original codes back bit for bit. fp8 writes the rows in place (the same tensors, so compiled code sees them) and
  keeps the original rows on the CPU while merged; optimum-quanto and nf4 (whose scales are not per row) quantise the
  whole layer again and keep the original layer.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import layer as peft_lora
from peft.tuners.lora import model as peft_model
from torch import nn

from flux_kernels.fp8 import quantize_fp8_rowwise

from ..errors import ConfigError, InputError
from ..lora_gemm import fp8_gemm_with_updates, fused_update_ready
from ..lora_update import acting_adapters, add_update, down_projection, plain_adapters
from .fp8 import Fp8Linear, FusedAway
from .layers import compute_dtype_of, device_of, plain_qbytes, quantized_kind, quantized_linear

_MERGES_ATTR = "_engine_lora_merges"  # on the module holding a merged quantised layer: {attribute: MergeRecord}


class QuantizedLoraLinear(peft_lora.Linear):
    """PEFT's LoRA Linear over a quantised base (or a FusedAway part of one): PEFT's forward, and merges that quantise
    the merged rows once from the original codes (module docstring)."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        return device_of(base_layer), compute_dtype_of(base_layer)

    @property
    def weight(self) -> torch.Tensor:
        """The base's weight where it has one; for an fp8 base, whose codes are no weight to compute with, an empty
        tensor on its device in its compute dtype (what PEFT reads it for: placing new tensors, as for FusedAway)."""
        base = self.get_base_layer()
        if isinstance(base, Fp8Linear):
            return torch.empty(0, device=device_of(base), dtype=compute_dtype_of(base))
        return base.weight

    @property
    def takes_fp8_input(self) -> bool:
        """An fp8 base that wants the norm / GELU kernels' e4m3 output still gets it with plain adapters acting: their
        A factors read the same activations (engine/lora_update.py)."""
        base = self.get_base_layer()
        names = acting_adapters(self)
        return getattr(base, "takes_fp8_input", False) and plain_adapters([(self, name) for name in names])

    def forward(self, x: torch.Tensor, *args, x_scale: torch.Tensor | None = None, out_dtype=None, **kwargs):
        """PEFT's forward; or, given e4m3 activations with their per-token scales (as an Fp8Linear takes them,
        positionally or by name), the base on them and each acting adapter's update beside it."""
        if args and isinstance(args[0], torch.Tensor):
            x_scale, args = args[0], args[1:]
        if x_scale is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        updates = [(self, name) for name in acting_adapters(self)]
        if out_dtype is None and isinstance(base, Fp8Linear):  # Fp8Linear's default
            out_dtype = base.bias.dtype if base.bias is not None else torch.bfloat16
        if fused_update_ready(base, x, [base.out_features], [updates], out_dtype):
            return fp8_gemm_with_updates(base, x, x_scale, [base.out_features], [updates])
        result = base(x, x_scale, out_dtype=out_dtype)
        for (_, name), low in zip(updates, down_projection(updates, x, x_scale, base), strict=True):
            result = add_update(result, 0, self, name, low, in_place=True)
        return result

    def update_layer(self, adapter_name: str, r: int, *args, config=None, **kwargs):
        variants = [name for name in ("use_dora", "use_bdlora") if getattr(config, name, False)]
        if variants or getattr(config, "lora_bias", False):
            what = ", ".join(variants) or "lora_bias"
            raise ConfigError(
                f"adapter {adapter_name!r} uses {what}, which needs the base layer's dequantised weight on every call; "
                "on a quantised transformer the engine runs plain LoRA only. Load it on an unquantised preset "
                "(kernels-compile, compile, baseline)"
            )
        return super().update_layer(adapter_name, r, *args, config=config, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = peft_lora.check_adapters_to_merge(self, adapter_names)
        adapter_names = [name for name in adapter_names if name in self.lora_A]
        if not adapter_names:
            return
        self.merged_adapters.extend(adapter_names)
        try:
            requantize_merged(self)  # every quantisation checks for non-finite values: safe_merge always holds
        except Exception:
            del self.merged_adapters[-len(adapter_names) :]
            raise

    def unmerge(self) -> None:
        if not self.merged:
            return
        self.merged_adapters.clear()
        requantize_merged(self)


def _library_layer_types() -> tuple[type, ...]:
    """optimum-quanto's and bitsandbytes' quantised Linears, those already imported (a model holding them has)."""
    found = []
    quanto_nn = sys.modules.get("optimum.quanto.nn")
    if quanto_nn is not None:
        found.append(quanto_nn.QLinear)
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    if bnb_nn is not None:
        found.append(bnb_nn.Linear4bit)
    return tuple(found)


@contextlib.contextmanager
def quantized_lora_dispatch() -> Iterator[None]:
    """While open, loading LoRA weights on a transformer the engine quantised works on its quantised layers: every
    LoraConfig PEFT injects maps them to QuantizedLoraLinear (PEFT's custom-layer dispatch, registered on the config
    as `_register_custom_module` does). diffusers' check of the adapter's input widths before that: route_width_checks.
    """
    original = peft_model.LoraModel._create_new_module
    mapping = {layer_type: QuantizedLoraLinear for layer_type in (Fp8Linear, FusedAway, *_library_layer_types())}

    def create_new_module(lora_config, adapter_name, target, **kwargs):
        lora_config._register_custom_module(mapping)
        return original(lora_config, adapter_name, target, **kwargs)

    peft_model.LoraModel._create_new_module = staticmethod(create_new_module)
    try:
        yield
    finally:
        peft_model.LoraModel._create_new_module = staticmethod(original)


_WIDTH_CHECKS = {"users": 0, "original": None}  # route_width_checks' patch: how many transformers hold it


def route_width_checks():
    """diffusers' `FluxLoraLoaderMixin._maybe_expand_lora_state_dict`, which every Flux pipeline's load_lora_weights
    calls before the transformer's own load, reads each target's weight from the transformer's state dict: on the
    engine's quantised layers (codes, FusedAway placeholders) a KeyError, from any pipeline over the transformer,
    optimised or not. While a transformer the engine quantised holds this patch, the mixin's method answers with
    `_check_input_widths` for such transformers (and those whose fused blocks fused layers quantised by diffusers)
    and is diffusers' own for every other one. Returns the undo (the
    last holder's puts diffusers' method back)."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    if _WIDTH_CHECKS["users"] == 0:
        original = _WIDTH_CHECKS["original"] = FluxLoraLoaderMixin.__dict__["_maybe_expand_lora_state_dict"]

        def expand(cls, transformer, lora_state_dict):
            own = functools.partial(original.__func__, cls)
            if not _reads_past_state_dict(transformer):
                return own(transformer=transformer, lora_state_dict=lora_state_dict)
            return _check_input_widths(own, transformer, lora_state_dict)

        FluxLoraLoaderMixin._maybe_expand_lora_state_dict = classmethod(expand)
    _WIDTH_CHECKS["users"] += 1
    done = []

    def undo() -> None:
        if done:
            return
        done.append(True)
        _WIDTH_CHECKS["users"] -= 1
        if _WIDTH_CHECKS["users"] == 0:
            FluxLoraLoaderMixin._maybe_expand_lora_state_dict = _WIDTH_CHECKS["original"]

    return undo


def _reads_past_state_dict(transformer) -> bool:
    """Whether diffusers' check would miss weights in the transformer's state dict: the engine quantised it
    (mark_quantized), or its fused blocks fused layers quantised by other means (diffusers' bitsandbytes / quanto:
    their parts are FusedAway placeholders)."""
    if getattr(transformer, "_flux_quant_mode", None) is not None:
        return True
    return any(isinstance(module, FusedAway) for module in transformer.modules())


def _check_input_widths(expand, transformer, lora_state_dict):
    """diffusers' `_maybe_expand_lora_state_dict` for the adapters on plain Linears (it may zero-pad their input, for
    Flux Control); for those on quantised layers, whose weights it cannot read, the input widths must match."""
    prefix, plain = "transformer.", {}
    for key, value in lora_state_dict.items():
        if not key.endswith(".lora_A.weight") or not key.startswith(prefix):
            continue
        name = key[len(prefix) : -len(".lora_A.weight")]
        try:
            module = transformer.get_submodule(name)
        except AttributeError:
            continue  # diffusers ignores modules the transformer lacks
        base = module.get_base_layer() if isinstance(module, peft_lora.LoraLayer) else module
        if quantized_kind(base) is None and not isinstance(base, FusedAway):
            plain[key] = value
        elif key.replace(".lora_A.", ".lora_B.") not in lora_state_dict:  # diffusers' own check reads Linears only
            raise InputError(
                f"the adapter has `{key}` without its `lora_B.weight`: the file is incomplete or not a LoRA for this "
                "model. Load the complete adapter"
            )
        elif value.shape[1] != base.in_features:
            raise InputError(
                f"the adapter's `{name}` takes {value.shape[1]} inputs; the transformer's quantised layer takes "
                f"{base.in_features}: it was made for another model (or widens the input, as Flux Control LoRAs do, "
                "which a quantised layer cannot). Load a LoRA for this model, or use an unquantised preset"
            )
    if plain:
        rest = {key: value for key, value in lora_state_dict.items() if key not in plain}
        lora_state_dict = {**rest, **expand(transformer=transformer, lora_state_dict=plain)}
    return lora_state_dict


# ----------------------------------------------------------------------------- merges


@dataclass
class MergeRecord:
    """What a merged quantised layer was before its first merge: fp8 rows (on the CPU) or the whole layer."""

    rows: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    layer: nn.Module | None = None


def _holder(layer: QuantizedLoraLinear) -> tuple[nn.Module, str, list[tuple[QuantizedLoraLinear, int, int]]]:
    """(module, attribute) of the quantised layer under `layer`, and every LoRA layer over its rows, with the rows."""
    base = layer.get_base_layer()
    if not isinstance(base, FusedAway):
        return layer, "base_layer", [(layer, 0, base.out_features)]
    block, parts = base.block, []
    for name in block.fused_projections[base.attr]:
        part = block.get_submodule(name)
        if isinstance(part, QuantizedLoraLinear):
            rows = part.get_base_layer()
            parts.append((part, rows.start, rows.stop))
    return block, base.attr, parts


@torch.no_grad()
def requantize_merged(layer: QuantizedLoraLinear) -> None:
    """Quantise the rows under `layer` (and under the other parts of its fused layer) again from the original codes
    plus every merged adapter's delta; restore the original exactly when nothing is merged."""
    holder, attr, parts = _holder(layer)
    records = holder.__dict__.setdefault(_MERGES_ATTR, {})
    deltas = {}
    for part, start, stop in parts:
        merged = [name for name in part.merged_adapters if name in part.lora_A]
        if merged:
            deltas[(start, stop)] = sum(part.get_delta_weight(name).float() for name in merged)
    current = getattr(holder, attr)
    record = records.get(attr)
    if record is None:
        if not deltas:
            return
        record = records[attr] = _snapshot(current, list(deltas))
    if isinstance(current, Fp8Linear):
        _merge_fp8_rows(current, record, deltas)
    else:
        setattr(holder, attr, _merged_layer(record.layer, deltas) if deltas else record.layer)
    if not deltas:
        del records[attr]


def _snapshot(current: nn.Module, rows: list[tuple[int, int]]) -> MergeRecord:
    if isinstance(current, Fp8Linear):
        return MergeRecord()  # rows are copied as they are first changed
    if quantized_kind(current) is None:
        raise ConfigError(f"cannot merge a LoRA adapter into a {type(current).__name__}: not a quantised layer")
    return MergeRecord(layer=current)


def _merge_fp8_rows(module: Fp8Linear, record: MergeRecord, deltas: dict) -> None:
    """Rows with a delta: the original rows (kept on the CPU) dequantised, plus the delta, quantised once, in place;
    rows whose delta went: their original codes and scales copied back."""
    for (start, stop), (codes, scales) in list(record.rows.items()):
        if (start, stop) not in deltas:
            module.weight_fp8[start:stop].copy_(codes)
            module.weight_scale[start:stop].copy_(scales)
            del record.rows[(start, stop)]
    for (start, stop), delta in deltas.items():
        if (start, stop) not in record.rows:
            record.rows[(start, stop)] = (
                module.weight_fp8[start:stop].to("cpu", copy=True), module.weight_scale[start:stop].to("cpu", copy=True)
            )  # fmt: skip
        codes, scales = record.rows[(start, stop)]
        device = module.weight_fp8.device
        weight = codes.to(device).float() * scales.to(device)[:, None] + delta.to(device)
        new_codes, new_scales = quantize_fp8_rowwise(weight, check_finite=True)
        module.weight_fp8[start:stop].copy_(new_codes)
        module.weight_scale[start:stop].copy_(new_scales.view(-1))


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The fp32 weight [out, in] a quantised layer computes with."""
    if isinstance(layer, Fp8Linear):
        return layer.dequantized_weight()
    kind = quantized_kind(layer)
    if kind == "nf4":
        import bitsandbytes.functional as bnb_f

        return bnb_f.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    if kind is not None:
        return plain_qbytes(layer.weight).dequantize().float()
    raise ConfigError(f"{type(layer).__name__} is not a quantised layer")


def _merged_layer(original: nn.Module, deltas: dict) -> nn.Module:
    """A new quantised layer of `original`'s kind: its dequantised weight plus the deltas, quantised once."""
    weight = dequantized_weight(original)
    for (start, stop), delta in deltas.items():
        weight[start:stop] += delta.to(weight.device)
    if not torch.isfinite(weight).all():
        raise ConfigError("the merged LoRA weights are not finite (NaN or inf): the adapter is broken; nothing merged")
    dtype = compute_dtype_of(original)
    with torch.device("meta"):
        linear = nn.Linear(original.in_features, original.out_features, bias=original.bias is not None)
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if original.bias is not None:
        linear.bias = nn.Parameter(original.bias.detach(), requires_grad=False)
    kind = quantized_kind(original)
    double_quant = kind == "nf4" and bool(original.weight.quant_state.nested)
    return quantized_linear(linear, kind, double_quant=double_quant)


def settle_merges(transformer: nn.Module) -> None:
    """After diffusers removed LoRA layers (unload_lora_weights), their merges stay in the weights, as diffusers keeps
    them: drop the originals kept for an unmerge that can no longer come."""
    for module in transformer.modules():
        records = module.__dict__.get(_MERGES_ATTR)
        if not records:
            continue
        for attr in list(records):
            if isinstance(module, peft_lora.LoraLayer):
                continue  # a LoRA layer still in place: its own unmerge restores the original
            names = getattr(module, "fused_projections", {}).get(attr, ())
            if not any(isinstance(module.get_submodule(name), QuantizedLoraLinear) for name in names):
                del records[attr]
