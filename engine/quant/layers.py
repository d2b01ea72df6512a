"""One quantised layer per mode (fp8, optimum-quanto's weight-only, bitsandbytes' nf4), and fused projections.

The engine's fused projections (`qkv`, `txt_qkv`, `linear1`, from engine/attention.py) are what run, so
they are what gets quantised; the original to_q/to_k/to_v/add_*_proj/proj_mlp modules are views of the
fused bf16 weight and are replaced by `FusedAway` placeholders first, or they would keep it alive.
The other order works too: a model quantised before it is fused (quantised while loading, or loaded from a
quantised checkpoint) has its quantised projections concatenated row by row (`fuse_quantized_linears`),
which is exactly what quantising the fused weight gives (nf4 with double quantisation: up to the second-level
scales).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantConfig
from ..errors import ConfigError
from .fp8 import Fp8Linear, FusedAway, KeepsInputDtype, fp8_layer_compute
from .policy import FUSED_VIEWS, QUANTO_MODES, parent_of


def _quanto_linear(linear: nn.Linear, mode: str) -> nn.Module:
    from optimum import quanto
    from optimum.quanto.nn import QLinear

    qmodule = QLinear.from_module(linear, weights=getattr(quanto, QUANTO_MODES[mode]))
    qmodule.freeze()
    return qmodule


def _nf4_linear(linear: nn.Linear, double_quant: bool) -> nn.Module:
    device = linear.weight.device
    if device.type != "cuda":
        raise ConfigError(
            f"nf4 quantisation runs bitsandbytes' CUDA kernels; the model is on {device.type}. Use a CUDA GPU, "
            "or 'int8-weight' / 'fp8-weight' here"
        )
    return _nf4_module(linear, double_quant)


def _nf4_module(linear: nn.Linear, double_quant: bool) -> nn.Module:
    """bitsandbytes' Linear4bit of `linear` on its device (the CPU only for tests of the layout: bitsandbytes
    quantises there too, the engine does not run nf4 there)."""
    import bitsandbytes as bnb

    device = linear.weight.device
    module = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=linear.weight.dtype,
        compress_statistics=double_quant,
        quant_type="nf4",
        device="meta",
    )
    module.weight = bnb.nn.Params4bit(
        linear.weight.detach(), requires_grad=False, compress_statistics=double_quant, quant_type="nf4", module=module
    ).to(device)  # the move quantises (bitsandbytes' design): from the weight already on `device`
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return module


def quantized_linear(
    linear: nn.Linear, mode: str, name: str = "", double_quant: bool = False, fp8_compute: str | None = None
) -> nn.Module:
    """A quantised copy of `linear` (the original is left as it is)."""
    if mode == "fp8":
        return Fp8Linear.from_linear(linear, compute=fp8_compute, name=name)
    if mode in QUANTO_MODES:
        return _quanto_linear(linear, mode)
    if mode == "nf4":
        return _nf4_linear(linear, double_quant)
    raise ConfigError(f"quantisation mode {mode!r} is not one of {', '.join(QuantConfig.MODES[1:])}")


def layer_sqnr(linear: nn.Linear, mode: str, inputs: torch.Tensor, double_quant: bool = False) -> float:
    """SQNR (dB) of `linear` quantised with `mode` against its own output on `inputs`, computed in fp32."""
    from ..measure import sqnr_db

    with torch.no_grad():
        reference = F.linear(
            inputs.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float()
        )
        quantized = quantized_linear(linear, mode, double_quant=double_quant)(inputs.to(linear.weight.dtype))
    return sqnr_db(quantized.float(), reference)


# ----------------------------------------------------------------------------- fused projections


def drop_fused_views(model: nn.Module) -> list[str]:
    """Replace the projections that view a fused Linear's weight (engine/attention.py) by FusedAway."""
    dropped = []
    for block_name, block in model.named_modules():
        for fused_name, views in FUSED_VIEWS.items():
            fused = getattr(block, fused_name, None)
            if type(fused) is not nn.Linear or not all(_has_linear(block, view) for view in views):
                continue
            replace_by_fused_away(block, f"{block_name}.{fused_name}", fused_name, views)
            dropped.extend(f"{block_name}.{view}" for view in views)
    return dropped


def replace_by_fused_away(block: nn.Module, full_name: str, fused_name: str, views: tuple[str, ...]) -> None:
    """Replace `block`'s projections `views` (in the fused layer's row order) by FusedAway placeholders that record
    their rows of `block.<fused_name>`."""
    start = 0
    for view in views:
        part = block.get_submodule(view)
        parent, child = parent_of(block, view)
        stop = start + part.out_features
        like = torch.empty(0, device=device_of(part), dtype=compute_dtype_of(part))
        setattr(parent, child, FusedAway(full_name, block, fused_name, start, stop, part.in_features, like))
        start = stop


def compute_dtype_of(layer: nn.Module) -> torch.dtype:
    """The dtype a Linear, quantised or not, computes in (its inputs', its outputs', a LoRA adapter's on it)."""
    if getattr(layer, "compute_dtype", None) is not None:  # bitsandbytes
        return layer.compute_dtype
    if isinstance(layer, Fp8Linear):
        return layer.bias.dtype if layer.bias is not None else torch.bfloat16
    return layer.weight.dtype  # nn.Linear, FusedAway; optimum-quanto's weights report their dequantised dtype


def device_of(layer: nn.Module) -> torch.device:
    """The device of a Linear's weights, quantised or not."""
    return layer.weight_fp8.device if isinstance(layer, Fp8Linear) else layer.weight.device


FUSABLE_KINDS = ("fp8", "nf4", *QUANTO_MODES)  # what fuse_quantized_linears concatenates exactly


def _fusable(kinds: set) -> bool:
    """Projections of these kinds fuse: all unquantised, or all quantised alike in a mode whose rows concatenate."""
    return kinds == {None} or (len(kinds) == 1 and kinds <= set(FUSABLE_KINDS))


def fuse_quantized_linears(parts: list[nn.Module], name: str = "") -> nn.Module:
    """One quantised Linear computing all of `parts` (outputs concatenated), for engine/attention.py's fused
    projections when the model was quantised before fusing (quantised while loading, or a quantised checkpoint).

    Every mode scales per output row (fp8, quanto) or per block of 64 within a row (nf4), so the fused layer is
    exactly what quantising the fused bf16 weight gives: the rows are concatenated, nothing is re-quantised.
    The one exception is nf4 with double quantisation, whose per-block scales are themselves quantised in
    groups of 256 across the whole weight: they are dequantised, concatenated and quantised again (the 4-bit
    codes are unchanged; the scales differ from the bf16 path by that second rounding).
    """
    kinds = {quantized_kind(part) for part in parts}
    in_features = {part.in_features for part in parts}
    if None in kinds or not _fusable(kinds):  # check_fusable refuses these before any block changes
        found = ", ".join(sorted({type(part).__name__ for part in parts}))
        raise ConfigError(
            f"cannot fuse the projections of `{name}`: they are {found}; fusing needs all of them quantised the "
            f"same way, as one of {', '.join(FUSABLE_KINDS)} (or none). Load the model again with one QuantConfig "
            "for the transformer"
        )
    if len(in_features) != 1 or any(part.bias is None for part in parts):
        raise ConfigError(f"cannot fuse the projections of `{name}`: they need the same input width and biases")
    kind = kinds.pop()
    bias = torch.cat([part.bias.detach() for part in parts])
    if kind == "fp8":
        fused = _fuse_fp8(parts)
    elif kind in QUANTO_MODES:
        fused = _fuse_quanto(parts)
    else:
        fused = _fuse_nf4(parts, name)
    fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused


def _fuse_fp8(parts: list[Fp8Linear]) -> Fp8Linear:
    weight_fp8 = torch.cat([part.weight_fp8 for part in parts])  # [sum(N), K]
    in_features, out_features = parts[0].in_features, weight_fp8.shape[0]
    compute = fp8_layer_compute(weight_fp8.device, in_features, out_features)  # what from_linear picks for it
    fused = Fp8Linear(in_features, out_features, bias=True, compute=compute, device="meta")
    fused.weight_fp8 = weight_fp8
    fused.weight_scale = torch.cat([part.weight_scale for part in parts])
    return fused


def plain_qbytes(weight):
    """quanto's kernel-agnostic WeightQBytesTensor of a weight (its CUDA Marlin fp8 packing undone)."""
    from optimum.quanto.tensor.weights import WeightQBytesTensor

    return weight if type(weight) is WeightQBytesTensor else weight.weight_qbytes_tensor()


def _fuse_quanto(parts: list[nn.Module]) -> nn.Module:
    from optimum.quanto.nn import QLinear
    from optimum.quanto.tensor.weights import WeightQBytesTensor

    weights = [plain_qbytes(part.weight) for part in parts]
    data = torch.cat([w._data for w in weights])  # [sum(N), K] int8 / float8
    scale = torch.cat([w._scale for w in weights])  # [sum(N), 1]
    out_features, in_features = data.shape
    with torch.device("meta"):
        shape = nn.Linear(in_features, out_features, bias=True, dtype=weights[0].dtype)
    fused = QLinear.qcreate(shape, weights=parts[0].weight_qtype, device="meta")  # as QLinear.from_module does
    fused.input_scale = parts[0].input_scale.clone()
    fused.output_scale = parts[0].output_scale.clone()
    weight = WeightQBytesTensor.create(
        weights[0].qtype, 0, size=data.shape, stride=data.stride(), data=data, scale=scale,
        activation_qtype=weights[0].activation_qtype,
    )  # fmt: skip
    fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused


def _fuse_nf4(parts: list[nn.Module], name: str) -> nn.Module:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_f

    states = [part.weight.quant_state for part in parts]
    blocksize, nested = states[0].blocksize, states[0].nested
    for part, state in zip(parts, states, strict=True):
        if (part.out_features * part.in_features) % blocksize or state.nested != nested:
            raise ConfigError(
                f"cannot fuse the nf4 projections of `{name}`: a {part.out_features}x{part.in_features} weight is not "
                f"a whole number of {blocksize}-element blocks (or they differ in double quantisation); use the "
                "unfused attention (AttentionConfig(backend='sdpa', fused_norms=False)) for this model"
            )
    packed = torch.cat([part.weight.data.reshape(-1) for part in parts]).reshape(-1, 1)  # 2 codes per byte
    if nested:
        absmax = torch.cat([bnb_f.dequantize_blockwise(s.absmax, s.state2) + s.offset for s in states])
        offset = absmax.mean()
        absmax, state2 = bnb_f.quantize_blockwise(absmax - offset, blocksize=256)  # as quantize_4bit does
    else:
        absmax, offset, state2 = torch.cat([s.absmax for s in states]), None, None
    out_features, in_features = sum(part.out_features for part in parts), parts[0].in_features
    state = bnb_f.QuantState(
        absmax=absmax, shape=torch.Size((out_features, in_features)), code=states[0].code, blocksize=blocksize,
        quant_type=states[0].quant_type, dtype=states[0].dtype, offset=offset, state2=state2,
    )  # fmt: skip
    fused = bnb.nn.Linear4bit(
        in_features, out_features, bias=True, compute_dtype=parts[0].compute_dtype, compress_statistics=nested,
        quant_type=states[0].quant_type, device="meta",
    )  # fmt: skip
    fused.weight = bnb.nn.Params4bit(
        packed, requires_grad=False, quant_state=state, blocksize=blocksize, compress_statistics=nested,
        quant_type=states[0].quant_type, quant_storage=packed.dtype, module=fused, bnb_quantized=True,
    )  # fmt: skip
    fused.quant_state = state
    return fused


def _has_linear(module: nn.Module, name: str) -> bool:
    try:
        return isinstance(module.get_submodule(name), nn.Linear)
    except AttributeError:
        return False


def quantized_kind(module: nn.Module) -> str | None:
    """'fp8', 'fp8-weight', 'int8-weight' or 'nf4' for a quantised Linear of ours or of the libraries; else None.
    The libraries are looked up only when already imported (a model holding their layers has imported them)."""
    if isinstance(module, KeepsInputDtype):
        module = module.inner
    if isinstance(module, Fp8Linear):
        return "fp8"
    quanto_nn = sys.modules.get("optimum.quanto.nn")
    if quanto_nn is not None and isinstance(module, quanto_nn.QLinear):
        qtype = getattr(module.weight_qtype, "name", "")
        return "fp8-weight" if "float8" in qtype else "int8-weight" if qtype == "qint8" else f"quanto-{qtype}"
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    if bnb_nn is not None and isinstance(module, bnb_nn.Linear4bit):
        return "nf4" if getattr(module.weight, "quant_type", "nf4") == "nf4" else "bnb-fp4"
    if bnb_nn is not None and isinstance(module, bnb_nn.Linear8bitLt):
        return "bnb-int8"
    return None


def check_fusable(model: nn.Module, name: str = "transformer") -> None:
    """Before the fused blocks replace any block: every group of projections the blocks fuse (FUSED_VIEWS) is
    unquantised, or quantised alike in a mode whose rows concatenate (diffusers' quantisation included: quanto's
    qint4, bitsandbytes' fp4 and 8-bit are not). Before, the refusal came from the first such block, after the ones
    before it were rewritten (restore() could not undo them, a retry failed on the placeholders), or the codes of an
    8-bit layer were fused as plain weights (a dtype error inside torch at the call)."""
    for block_name, block in model.named_modules():
        for views in FUSED_VIEWS.values():
            try:
                parts = [block.get_submodule(view) for view in views]
            except AttributeError:
                continue
            kinds = {quantized_kind(part) for part in parts}
            if _fusable(kinds):
                continue
            found = sorted({f"{type(part).__name__} ({quantized_kind(part) or 'unquantised'})" for part in parts})
            raise ConfigError(
                f"{name}.{block_name}: the engine's fused blocks fuse {', '.join(views)} into one layer, and they "
                f"are {', '.join(found)}; fusing takes them unquantised or all quantised as one of "
                f"{', '.join(FUSABLE_KINDS)}. Nothing was changed. Load the model unquantised (or with the engine's "
                "QuantConfig), or use the 'baseline' or 'compile' preset, which keep diffusers' blocks"
            )
