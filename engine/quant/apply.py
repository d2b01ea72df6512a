"""Quantising a pipeline's components: `apply_quantization`, the per-layer step, and quantising while loading.

`apply_quantization(pipe, QuantConfig)` replaces the Linear layers of the transformer, T5 (text_encoder_2)
and CLIP (text_encoder) in place, one layer at a time, so that each bf16 weight is freed as soon as its
quantised copy exists (the peak is the bf16 model loaded before it, plus one layer; quantising while loading,
below, avoids the bf16 model altogether).

Quantise while loading: `engine.models.load_local_components(..., quant=QuantConfig(...))` builds each
quantised component on the meta device and hands each Linear to `LoadQuantizer` as its tensors are read, so the
device never holds the bf16 component (peak: quantised size + one layer); the per-layer step (`quantize_layer`)
is the one apply_quantization uses, so the result is identical, and apply_quantization then leaves it alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from flux_kernels.fp8 import FP8_DTYPE

from ..config import QuantConfig
from ..errors import ConfigError
from .fp8 import Fp8Linear, FusedAway, KeepsInputDtype
from .layers import drop_fused_views, quantized_kind, quantized_linear
from .policy import COMPONENTS, T5_WO, kept_linears, parent_of, quantizable_linears


def _probe(in_features: int, like: torch.Tensor, tokens: int = 64) -> torch.Tensor:
    generator = torch.Generator(device=like.device).manual_seed(in_features)
    return torch.randn(tokens, in_features, generator=generator, device=like.device, dtype=like.dtype)


@dataclass
class ComponentQuant:
    """What quantising one component did: its mode, the layers it replaced and kept, probe SQNR per layer."""

    mode: str
    quantized: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    fused_away: list[str] = field(default_factory=list)
    sqnr_db: dict[str, float] = field(default_factory=dict)


def quantize_model(
    model: nn.Module, mode: str, component: str = "transformer", double_quant: bool = False, record_sqnr: bool = True
) -> ComponentQuant:
    """Replace `model`'s Linears by `mode` layers in place, one at a time (each bf16 weight freed as it goes).

    record_sqnr: per layer, the output SQNR on a N(0, 1) probe of 64 tokens (cheap: one small matmul
    per layer while the bf16 weight still exists).
    """
    result = ComponentQuant(mode=mode, kept=kept_linears(model, component))
    result.fused_away = drop_fused_views(model)
    for name in [n for n, _ in quantizable_linears(model, component)]:  # names: a module list would pin them all
        linear = model.get_submodule(name)
        parent, child = parent_of(model, name)
        setattr(parent, child, quantize_layer(linear, name, mode, component, double_quant, result, record_sqnr))
        del linear  # the last reference to the bf16 weight: freed here, not at the end
    mark_quantized(model, result, double_quant)
    return result


def quantize_layer(
    linear: nn.Linear,
    name: str,
    mode: str,
    component: str,
    double_quant: bool = False,
    record: ComponentQuant | None = None,
    record_sqnr: bool = True,
) -> nn.Module:
    """The quantised module that replaces the Linear `name` of `component`: the one per-layer step of both
    `quantize_model` (after loading) and the loader's quantise-while-loading (engine.models), so the two give
    identical modules. `record` collects the name and, with record_sqnr, the probe SQNR (one 64-token matmul
    while the bf16 weight still exists)."""
    is_t5_wo = component == "text_encoder_2" and name.rpartition(".")[2] == T5_WO
    compute = "weight-only" if (is_t5_wo and mode == "fp8" and linear.weight.is_cuda) else None
    with torch.no_grad():
        qmodule = quantized_linear(linear, mode, name=name, double_quant=double_quant, fp8_compute=compute)
        if record is not None and record_sqnr:
            from ..measure import sqnr_db

            probe = _probe(linear.in_features, linear.weight)
            record.sqnr_db[name] = sqnr_db(qmodule(probe).float(), linear(probe).float())
    if is_t5_wo and mode in ("fp8", "nf4"):
        qmodule = KeepsInputDtype(qmodule, linear.weight.dtype)
    if record is not None:
        record.quantized.append(name)
    return qmodule


def mark_quantized(model: nn.Module, record: ComponentQuant, double_quant: bool = False) -> None:
    """Tag `model` as quantised (apply_quantization then leaves it alone) and keep what quantising it did; its
    load_state_dict then refuses float weights its quantised layers cannot take (`_refuse_float_weights`)."""
    model._flux_quant_mode = record.mode
    model._flux_nf4_double_quant = double_quant
    model._flux_quant_record = record
    if "_flux_load_guard" not in model.__dict__:
        model._flux_load_guard = model.register_load_state_dict_pre_hook(_refuse_float_weights)
    if hasattr(model, "transformer_blocks"):  # a FLUX transformer or ControlNet (the text encoders visit the GPU)
        model.__dict__["_flux_weight_marks"] = _weight_marks(model)
        if "_flux_edit_guard" not in model.__dict__:
            model._flux_edit_guard = model.register_forward_pre_hook(_refuse_weight_edits)


def _weight_marks(model: nn.Module) -> list:
    """[name, module, where, tensor, _signature(tensor)] of the `weight` each quantised layer still shows but
    does not compute from: the fused projections' placeholders (FusedAway: an empty tensor) and quanto's layers
    (their weight's codes are read, not the tensor's own data). Our Fp8Linear has no `weight` (an edit fails)."""
    marks = []
    for name, module in model.named_modules():
        if isinstance(module, FusedAway) or quantized_kind(module) in ("int8-weight", "fp8-weight"):
            where = "_buffers" if "weight" in module._buffers else "_parameters"
            tensor = getattr(module, where).get("weight")
            if tensor is not None:
                marks.append([name, module, where, tensor, _signature(tensor)])
    return marks


def _signature(tensor: torch.Tensor) -> tuple:
    """In-place edits bump the version; `.data = W` changes the shape (an empty placeholder) or, on quanto's
    weight (a tensor subclass without storage of its own: data_ptr 0), the data pointer."""
    return tensor._version, tuple(tensor.shape), tensor.data_ptr()


@torch.compiler.disable  # run as it is under a compile of the whole model: dynamo recursed in quanto's tensor subclass
def _refuse_weight_edits(model: nn.Module, args) -> None:
    """Each call of a quantised model: a weight edited in place (`.weight.mul_()`, `.weight.data = W`) after
    quantising is refused; before, the layer went on computing from its codes (a different image from diffusers',
    without a word). A tensor replaced by one of the same shape (`.to()`, a new Parameter, which quanto quantises
    at its next call) is taken as the new mark. Under block / leaf offload (only our fp8 and nf4 stream) an in-place
    edit of a placeholder is not seen: the streamer's own copies bump its version."""
    streamed = model.__dict__.get("_engine_streamed", False)  # offload's copies bump the placeholders' versions
    for mark in model.__dict__.get("_flux_weight_marks", ()):
        name, module, where, tensor, signature = mark
        current = getattr(module, where).get("weight")
        if current is None or (current is tensor and _signature(current)[streamed:] == signature[streamed:]):
            continue
        if current is not tensor and current.shape == signature[1]:
            mark[3:] = current, _signature(current)
            continue
        kind = "fused into a quantised layer" if isinstance(module, FusedAway) else "quantised"
        raise ConfigError(
            f"{type(model).__name__}.{name}.weight was changed after the engine quantised the model "
            f"({model._flux_quant_mode!r}); the layer is {kind} and computes from its codes, so the edit would do "
            "nothing (a different image from diffusers', without a word). Edit the weights before optimize() (or "
            "load the edited model and optimize it again), or use a LoRA (load_lora_weights / fuse_lora)"
        )


def _refuse_float_weights(model: nn.Module, state_dict, prefix: str, *_args) -> None:
    """load_state_dict's pre hook on a quantised model, before anything is copied. A float state dict (diffusers' or
    transformers' keys) does not fit quantised layers: our fp8 layers hold `weight_fp8` / `weight_scale` (and fused
    projections hold their parts' weights under one name), so its weights were dropped as unexpected keys and, with
    strict=False, the old weights kept; quanto's and bitsandbytes' layers took a float `weight` under their own key
    without quantising it again: a different image, without a word, even with strict=True. Refused, naming the fix.
    LoRA keys (PEFT's, which diffusers' LoRA loaders hand to load_state_dict) pass."""
    own = model.state_dict(keep_vars=True, prefix=prefix)
    refused = []
    for key, value in state_dict.items():
        if not key.startswith(prefix) or ".lora_" in key:
            continue
        if key not in own:
            refused.append(key)
        elif key.endswith(".weight") and type(value) is torch.Tensor and value.is_floating_point():
            layer = model.get_submodule(key[len(prefix) : -len(".weight")])
            if quantized_kind(layer) is not None and value.dtype != FP8_DTYPE:
                refused.append(key)
    if refused:
        raise ConfigError(
            f"load_state_dict: {type(model).__name__} was quantised as {model._flux_quant_mode!r} by the engine, and "
            f"{len(refused)} of the state dict's tensors, e.g. {refused[:2]}, are float weights its quantised layers "
            "cannot take (dropped with strict=False, or taken without quantising: a different image, without a "
            "word). Nothing was loaded. Quantisation is not undone in place: load the weights into the bf16 "
            "transformer before optimize() (a pipeline built from the fine-tuned weights, then optimize(pipe, "
            "config)); a folder from engine.quant.save_quantized loads with FluxEngine.from_pretrained"
        )


class LoadQuantizer:
    """Quantises a component's Linears one at a time as engine.models' streamed loader fills them
    (`load_local_components(..., quant=QuantConfig(...))`), with the same per-layer step and kept list as
    apply_quantization, so the loaded component is identical to loading it whole and quantising it."""

    def __init__(self, component: str, mode: str, double_quant: bool = False, record_sqnr: bool = True):
        if component not in COMPONENTS or mode not in QuantConfig.MODES[1:]:
            raise ConfigError(
                f"cannot quantise {component!r} as {mode!r} while loading; components: {', '.join(COMPONENTS)}, "
                f"modes: {', '.join(QuantConfig.MODES[1:])}"
            )
        self.component, self.mode, self.double_quant, self.record_sqnr = component, mode, double_quant, record_sqnr
        self.record = ComponentQuant(mode=mode)

    def layer_names(self, model: nn.Module) -> set[str]:
        """The Linears to quantise (on the meta-device model, before any weight is read)."""
        self.record.kept = kept_linears(model, self.component)
        return {name for name, _ in quantizable_linears(model, self.component)}

    def __call__(self, name: str, linear: nn.Linear) -> nn.Module:
        return quantize_layer(
            linear, name, self.mode, self.component, self.double_quant, self.record, self.record_sqnr
        )  # fmt: skip

    def finish(self, model: nn.Module) -> None:
        mark_quantized(model, self.record, self.double_quant)


def quant_mode_of(model: nn.Module | None) -> str | None:
    """The mode `model` is quantised in (its tag, else its layers' types), or None for an unquantised model."""
    if model is None:
        return None
    mode = getattr(model, "_flux_quant_mode", None)
    if mode is not None:
        return mode
    for module in model.modules():
        kind = quantized_kind(module)
        if kind is not None:
            return kind
    return None


def is_quantized_layer(module: nn.Module) -> bool:
    """A quantised Linear (ours, optimum-quanto's or bitsandbytes' 4-bit), wrapped or not."""
    return quantized_kind(module) is not None


@dataclass
class QuantState:
    """What apply_quantization did, per component."""

    config: QuantConfig
    components: dict[str, ComponentQuant] = field(default_factory=dict)


def apply_quantization(pipe, config: QuantConfig) -> QuantState | None:
    """Quantise the pipeline's components per `config`; None when every component is 'none'.

    A component already quantised in the same mode (quantised while loading, or loaded from a quantised
    checkpoint) is left as it is: optimize() after a quantised load does not quantise twice.
    """
    if all(getattr(config, c) == "none" for c in COMPONENTS):
        return None
    state = QuantState(config=config)
    for component in COMPONENTS:
        mode = getattr(config, component)
        model = getattr(pipe, component, None)
        if mode == "none" or model is None:
            continue
        previous = quant_mode_of(model)
        if previous is None:
            state.components[component] = quantize_model(model, mode, component, config.nf4_double_quant)
            set_fp8_options(model, config)
            keep_fp8_codes(model)
            continue
        _check_mode(component, model, mode, config)
        record = getattr(model, "_flux_quant_record", None)
        state.components[component] = record or ComponentQuant(
            mode=mode, kept=kept_linears(model, component), quantized=_quantized_names(model)
        )
        set_fp8_options(model, config)
        keep_fp8_codes(model)
    return state


def check_quant_modes(pipe, config: QuantConfig) -> None:
    """What apply_quantization would refuse, checked before any step of optimize() runs (before, the refusal came
    after the blocks were fused: a pipeline half-changed that restore() could not undo)."""
    for component in COMPONENTS:
        mode, model = getattr(config, component), getattr(pipe, component, None)
        if mode != "none" and model is not None and quant_mode_of(model) is not None:
            _check_mode(component, model, mode, config)


def _check_mode(component: str, model: nn.Module, mode: str, config: QuantConfig) -> None:
    """A component quantised already (while loading, a quantised checkpoint, diffusers' or transformers' own
    quantisation) must be in the config's mode."""
    previous = quant_mode_of(model)
    if previous != mode:
        raise ConfigError(
            f"{component} is already quantised as {previous!r}; load it again (unquantised, or with "
            f"QuantConfig({component}={mode!r}) to quantise while loading) to use {mode!r}, or keep its quantisation "
            f"with QuantConfig({component}='none')"
        )
    double_quant = getattr(model, "_flux_nf4_double_quant", config.nf4_double_quant)
    if mode == "nf4" and double_quant != config.nf4_double_quant:
        raise ConfigError(
            f"{component} is already quantised as nf4 with nf4_double_quant={double_quant}; the config asks "
            f"{config.nf4_double_quant}: load it again with the config's QuantConfig"
        )


def keep_fp8_codes(model: nn.Module) -> None:
    """Every Fp8Linear of `model` keeps its e4m3 codes and fp32 scales through `.to(dtype)`, `.half()` and the like
    (Module._apply): they move to the new device only; the bias follows the conversion. Before,
    `pipe.to(torch.bfloat16)` gave the codes that dtype without a word: the weights' memory doubled, the fp8 GEMMs
    fed 16-bit weights. Idempotent."""
    for module in model.modules():
        if isinstance(module, Fp8Linear) and "_apply" not in module.__dict__:
            module._apply = functools.partial(_apply_keeping_codes, module, module._apply)


def _apply_keeping_codes(layer: nn.Module, apply, fn, *args, **kwargs):
    scale = layer._buffers.get("weight_scale")

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype != FP8_DTYPE and tensor is not scale:
            return fn(tensor)
        return tensor.to(fn(tensor.new_empty(0)).device)  # where the conversion would put it, as it is

    return apply(keep, *args, **kwargs)


def set_fp8_options(model: nn.Module, config: QuantConfig) -> None:
    """The config's run-time fp8 options on every Fp8Linear of `model` (they are not part of the weights)."""
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.fast_accum, module.fused_input = config.fp8_fast_accum, config.fp8_fused_input


def _quantized_names(model: nn.Module) -> list[str]:
    names, wrapped = [], set()
    for name, module in model.named_modules():
        if id(module) not in wrapped and quantized_kind(module) is not None:
            names.append(name)
            if isinstance(module, KeepsInputDtype):
                wrapped.add(id(module.inner))
    return names
